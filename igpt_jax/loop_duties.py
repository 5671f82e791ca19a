"""What the training loop does besides the step, each a small object it calls in turn (as clu's
periodic actions): the device's pace and the watchdog, logging and evaluation, sample grids,
checkpoints, the profiler. Each decides for itself whether a step is its business."""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from flax import nnx

from igpt_jax import distributed
from igpt_jax import evaluation
from igpt_jax import goodput
from igpt_jax import metrics as metrics_lib
from igpt_jax import model as model_lib
from igpt_jax import objectives
from igpt_jax import sharding as sharding_lib
from igpt_jax import train as train_lib
from igpt_jax import workdir as workdir_lib
from igpt_jax.config import RunFailed


class NonFiniteLoss(RunFailed):
  """Too many non-finite steps in a row: the run diverged."""


class Pace:
  """The device's progress: step s is waited for once step s + 1 is queued behind it (so the
  device never idles for the host), and only then does the watchdog hear of it; on a CPU mesh
  of several devices every step is waited for (evaluation.one_in_flight)."""

  def __init__(self, watchdog, mesh):
    self.watchdog, self.previous = watchdog, None
    self.wait_each_step = evaluation.one_in_flight(mesh)

  def dispatched(self, step: int, loss) -> None:
    if self.previous is not None:  # the step before this one, finished on the device
      jax.block_until_ready(self.previous[1])
      self.watchdog.beat(self.previous[0])
    self.previous = (step, loss)
    if self.wait_each_step:  # and on a CPU mesh this one too
      jax.block_until_ready(loss)
      self.watchdog.beat(step)
      self.previous = None

  def caught_up(self, step: int) -> None:
    """The host has waited for `step`'s loss (a logged step)."""
    if self.previous is not None:
      self.watchdog.beat(step)
      self.previous = None


class LogSteps:
  """Every train.log_every steps, at evaluation steps and at the last: the step's scalars
  (loss, bits/dim, throughput, MFU, each host's input time), the evaluations due, one metrics
  row and the progress line. `summary` is the last row."""

  def __init__(self, run, writer, start: int, pace: Pace, watchdog):
    self.run, self.writer, self.pace, self.watchdog = run, writer, pace, watchdog
    cfg = run.cfg
    self.flops_per_token = model_lib.flops_per_token(cfg)
    self.device_kind = jax.devices()[0].device_kind
    self.tokens_per_step = run.tcfg.batch_size * cfg.seq_len
    self.last_time, self.last_step, self.input_s = time.perf_counter(), start, 0.0
    self.progress = metrics_lib.Progress(run.tcfg.steps, start,
                                         log=run.log if distributed.is_chief() else None)
    self.summary = {}

  def waited_for_input(self, seconds: float) -> None:
    """This host's own time per log interval: reading and assembling its rows."""
    self.input_s += seconds

  def due(self, step: int, is_last: bool) -> bool:
    tcfg = self.run.tcfg
    return step % tcfg.log_every == 0 or is_last or evaluation.eval_due(self.run.trainer, step,
                                                                          is_last)

  def __call__(self, step: int, out: dict, params, is_last: bool, preempted: bool) -> bool:
    """Logs `step`; returns whether a stop came during its evaluation (then: save and stop)."""
    run, tcfg = self.run, self.run.tcfg
    stop_if_nonfinite(out, step, tcfg.max_nonfinite_steps, run.ckpt)
    loss = float(out["loss"])  # waits for the step
    self.pace.caught_up(step)
    goodput.TIMELINE.switch("steps")  # a span per log interval: a killed run loses at most one
    now = time.perf_counter()
    steps_done = max(step - self.last_step, 1)
    tokens_per_s = self.tokens_per_step * steps_done / max(now - self.last_time, 1e-9)
    hosts = metrics_lib.host_times((now - self.last_time) / steps_done, self.input_s / steps_done)
    self.last_time, self.last_step, self.input_s = now, step, 0.0
    scalars = {"loss": loss, "bits_per_dim": objectives.bits_per_dim(
                   float(out.get("gen_loss", loss)), run.config.data.channels),
               **{k: float(out[k]) for k in ("grad_norm", "lr", "clf_loss", "accuracy",
                                             "skipped") if k in out},
               "tokens_per_s": tokens_per_s, "step_s": self.watchdog.median(),
               "mfu": metrics_lib.mfu(tokens_per_s, self.flops_per_token, self.device_kind,
                                      len(jax.devices())), **hosts}
    if jax.process_count() > 1 and distributed.is_chief():
      run.log(metrics_lib.host_times_line(hosts))
    stopped = False
    if not preempted:  # a preempted step saves first: no evaluation in the grace time
      with self.watchdog.paused(), goodput.TIMELINE.during("evaluation"):
        try:
          scalars.update(evaluation.evaluations_due(
              run.trainer, params, step, is_last, run.eval_data, run.test_data, run.tokenizer,
              run.config))
        except distributed.Preempted:  # stopped mid-evaluation: save this step
          stopped = True
    self.writer.write(step, scalars)
    self.progress.update(step, scalars)
    self.summary = scalars
    return stopped

  def close(self) -> None:
    self.progress.close()


class SampleGrids:
  """Pretraining (AR): a grid of unconditional samples every train.sample_every steps and at the
  last, to TensorBoard, with what it cost."""

  def __init__(self, run, writer, watchdog):
    self.run, self.writer, self.watchdog = run, writer, watchdog
    self.last_end = time.perf_counter()
    self.every = run.tcfg.sample_every if run.stage == "pretrain" and run.cfg.causal else 0

  def __call__(self, step: int, params, is_last: bool, preempted: bool) -> None:
    if not self.every or preempted or not (step % self.every == 0 or is_last):
      return
    began = time.perf_counter()
    with self.watchdog.paused(), goodput.TIMELINE.during("sample_grid"):
      self.writer.write_image(step, "samples", sample_grid(self.run.trainer, params,
                                                           self.run.centers, self.run.config,
                                                           step))
    spent = time.perf_counter() - began
    since = max(began - self.last_end, 1e-9)
    self.last_end = time.perf_counter()
    self.run.log(f"Sample grid at step {step}: {spent:.1f} s, {100 * spent / since:.0f}% of the "
                 f"{since:.0f} s trained since the last one (train.sample_every=0 turns it off).")


class Saves:
  """A checkpoint every checkpoint.every steps, at the last and at a stop; the metrics and the
  goodput spans up to it go to storage with it (object stores)."""

  def __init__(self, run, writer):
    self.run, self.writer = run, writer

  def __call__(self, step: int, state, out: dict, is_last: bool, preempted: bool) -> None:
    run = self.run
    if not (step % run.config.checkpoint.every == 0 or is_last or preempted):
      return
    stop_if_nonfinite(out, step, run.tcfg.max_nonfinite_steps, run.ckpt)
    if preempted:
      goodput.TIMELINE.note("preempted", step=step)
    with goodput.TIMELINE.during("checkpoint"):
      run.ckpt.save(step, state, checkpoint_meta(
          run.config, run.cfg, run.centers,
          run.data.class_names if run.stage == "finetune" else None, run.input_view,
          run.split_rule))
    self.writer.flush()  # on object stores: the rows and spans up to the checkpoint
    goodput.TIMELINE.flush()


def checkpoint_meta(config, cfg: model_lib.ModelConfig, centers, class_names=None,
                    input_view=None, split_rule: str = "permutation") -> dict:
  """What a checkpoint says about itself: its config, model shape and palette (with a digest
  that every stage reading the checkpoint compares with the palette it would use), a
  classifier's class names (export's id2label), how its images were viewed (export's image
  processor) and how validation was held out of its train split (a resume must keep it)."""
  meta = {"config": config.to_dict(), "model": dataclasses.asdict(cfg),
          "palette": np.asarray(centers).tolist(),
          "palette_sha256": workdir_lib.palette_digest(centers), "split_rule": split_rule}
  if class_names is not None:
    meta["class_names"] = list(class_names)
  if input_view is not None:
    meta["input_view"] = input_view
  return meta


class Profiler:
  """`train.profile_steps='START,END'`: a jax.profiler trace of those steps under `directory`
  (TensorBoard's profile tab reads it), on the processes where `enabled`."""

  def __init__(self, steps: str, directory, enabled: bool, log=print):
    self.first, self.last = (map(int, steps.split(","))) if steps else (0, -1)
    self.directory, self.enabled, self.log, self.active = directory, enabled and bool(steps), log, False

  def before(self, step: int) -> None:
    if self.enabled and step == self.first:
      self.directory.mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(str(self.directory))
      self.active = True

  def after(self, step: int, state) -> None:
    if self.active and step >= self.last:
      jax.block_until_ready(state)  # the trace holds the device work of the last step too
      self.close()
      self.log(f"Profile of steps {self.first}-{self.last} written to {self.directory} "
               "(TensorBoard: Profile tab).")

  def close(self) -> None:
    if self.active:
      self.active = False
      jax.profiler.stop_trace()


def stop_if_nonfinite(out: dict, step: int, limit: int, ckpt) -> None:
  """Raises once a streak of `limit` non-finite steps in a row has happened, whenever since the
  last check (the step keeps the longest). Those steps were never applied, and this check runs
  before every save, so the state (and any checkpoint) is still the last good one."""
  streak = int(out["nonfinite_longest"])
  if streak >= limit:
    ckpt.wait()
    steps = ckpt.all_steps()
    raise NonFiniteLoss(
        f"{streak} steps in a row by step {step} had non-finite gradients or updates and "
        f"were skipped; the last good checkpoint (step {steps[-1] if steps else 'none'}) is "
        "kept. Lower the learning rate or lengthen the warmup, then rerun to resume from it.")


def sample_grid(trainer: train_lib.Trainer, params, centers, config, step: int) -> np.ndarray:
  """8 unconditional samples from the current (sharded) parameters, as one uint8 image row.

  Every process takes part (the sampling loop is one jitted program over the mesh)."""
  from igpt_jax import palette as palette_lib
  from igpt_jax import sample as sample_lib
  model = nnx.merge(trainer.graphdef, params)
  with sharding_lib.activation_sharding(trainer.mesh, trainer.rules):
    tokens = sample_lib.generate(model, 8, jax.random.fold_in(jax.random.key(config.seed), step))
  res = config.data.resolution
  images = palette_lib.dequantize(distributed.to_host(tokens), centers).reshape(
      -1, res, res, centers.shape[1])
  return sample_lib.image_grid([images])
