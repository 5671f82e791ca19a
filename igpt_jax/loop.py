"""The training loop of pretrain and finetune, and evaluation: data in, checkpoints and metrics
out, resumption, preemption and the stop on non-finite steps.

Every process runs the same loop: it feeds the rows of each global batch that its devices hold
(sharding.host_rows), saves checkpoints together with the others (Orbax), and stops at the same
step as the others on preemption (distributed.PREEMPTION). Only process 0 writes metrics.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time

import jax
import numpy as np
from flax import nnx

from igpt_jax import attention as attention_lib
from igpt_jax import checkpoint as checkpoint_lib
from igpt_jax import distributed
from igpt_jax import goodput
from igpt_jax import head as head_lib
from igpt_jax import metrics as metrics_lib
from igpt_jax import model as model_lib
from igpt_jax import objectives
from igpt_jax import optim
from igpt_jax import sharding as sharding_lib
from igpt_jax import train as train_lib
from igpt_jax import workdir as workdir_lib
from igpt_jax.config import RunFailed, UserError
from igpt_jax.watchdog import Watchdog


class NonFiniteLoss(RunFailed):
  """Too many non-finite steps in a row: the run diverged."""


def evaluate(trainer: train_lib.Trainer, params, eval_data, tokenizer, config,
             max_batches: int = 0, prefix: str = "eval") -> dict:
  """Held-out mean NLL (nats/token) and bits/dim; for a finetuning trainer also accuracy.
  Keys are `{prefix}_loss`, `{prefix}_bits_per_dim`, `{prefix}_accuracy`.

  Every process runs the same number of padded global batches (its rows of each)."""
  from igpt_jax.data import pipeline
  batch_size = trainer.train_cfg.batch_size
  rows = sharding_lib.host_rows(trainer.mesh, trainer.rules, batch_size)
  sums = None
  batches = pipeline.eval_batches(eval_data, batch_size=batch_size, rows=rows,
                                  augment=config.data.augment)
  if max_batches:
    batches = itertools.islice(batches, max_batches)
  # A whole split is long: a stop (every process at the same batch) ends it, and the caller
  # keeps what it has (the training loop saves its step).
  for batch in distributed.PREEMPTION.batches(batches, config.stage):
    g = sharding_lib.global_batch({k: batch[k] for k in ("images", "boxes", "labels", "mask")},
                                  trainer.mesh, trainer.rules, batch_size)
    tokens = tokenizer(g["images"], g["boxes"])
    out = trainer.eval_fn(params, tokens, g["labels"], g["mask"])
    sums = out if sums is None else _add(sums, out)  # on the device: no wait per batch
    if one_in_flight(trainer.mesh):
      jax.block_until_ready(sums)
  # One wait per evaluation: replicated scalars, every process holds them whole.
  total = {"nll": 0.0, "tokens": 0.0, "correct": 0.0, "examples": 0.0,
           **{k: float(v) for k, v in jax.device_get(sums or {}).items()}}
  nats = total["nll"] / max(total["tokens"], 1.0)
  out = {f"{prefix}_loss": nats,
         f"{prefix}_bits_per_dim": objectives.bits_per_dim(nats, config.data.channels)}
  if trainer.stage == "finetune":
    out[f"{prefix}_accuracy"] = total["correct"] / max(total["examples"], 1.0)
    out[f"{prefix}_examples"] = int(total["examples"])
  return out


@jax.jit
def _add(a: dict, b: dict) -> dict:
  return jax.tree.map(lambda x, y: x + y, a, b)


def one_in_flight(mesh) -> bool:
  """XLA's CPU collectives deadlock when programs queue up (see logreg.fit_streamed): on a CPU
  mesh of several devices each step waits for the last. Accelerators keep async dispatch."""
  return mesh.devices.flat[0].platform == "cpu" and mesh.devices.size > 1


def eval_split(config, log=print):
  """Training-time evaluation reads validation (test is for final numbers), or test when
  data.validation_fraction is 0."""
  from igpt_jax.data import sources
  if sources.validation_fraction(config) == 0:
    log("data.validation_fraction=0: evaluating on the test split during training.")
    return sources.load(config, "test", log=log)
  return sources.load(config, "validation", log=log)


def checkpoint_meta(config, cfg: model_lib.ModelConfig, centers, class_names=None) -> dict:
  """What a checkpoint says about itself: its config, model shape and palette (with a digest
  that every stage reading the checkpoint compares with the palette it would use), and a
  classifier's class names (export's id2label)."""
  meta = {"config": config.to_dict(), "model": dataclasses.asdict(cfg),
          "palette": np.asarray(centers).tolist(),
          "palette_sha256": workdir_lib.palette_digest(centers)}
  if class_names is not None:
    meta["class_names"] = list(class_names)
  return meta


def pretrain(config, workdir, log=print, stop_after: int | None = None) -> dict:
  return fit(config, workdir, "pretrain", log=log, stop_after=stop_after)


def finetune(config, workdir, log=print, stop_after: int | None = None) -> dict:
  return fit(config, workdir, "finetune", log=log, stop_after=stop_after)


def fit(config, workdir, stage: str, log=print, stop_after: int | None = None) -> dict:
  """The training loop of both stages; resumes from the newest intact checkpoint.

  Pretraining starts from a fresh init; fine-tuning from the pretraining checkpoint's
  parameters plus a zero class head. `stop_after` ends this run at that step with a
  checkpoint, as a preemption would, without changing the schedule (set by the step count).
  A stage already trained to its last step trains nothing and reports its result again.
  SIGTERM / Ctrl-C (distributed.PREEMPTION) stop it at the next step, or in the middle of an
  evaluation, with that step saved; before the first step, with nothing to save.
  """
  with distributed.PREEMPTION.installed():
    return _fit(config, workdir, stage, log, stop_after)


def _fit(config, workdir, stage: str, log, stop_after: int | None) -> dict:
  from igpt_jax import palette as palette_lib
  from igpt_jax.data import pipeline, sources, transform

  preemption, timeline = distributed.PREEMPTION, goodput.TIMELINE
  timeline.begin(workdir, stage)
  mesh = sharding_lib.make_mesh(config.mesh)  # first: a mesh that does not fit fails at once
  rules = sharding_lib.rules_from_config(config)
  centers = workdir_lib.load_palette(config, workdir)  # stages.pretrain fits one if missing
  data = sources.load(config, "pretrain" if stage == "pretrain" else "train", log=log)
  eval_data = eval_split(config, log)
  test_data = lambda: sources.load(config, "test", log=log)  # noqa: E731
  palette_lib.Palette(centers).check_channels(data.images.shape[-1])
  log(f"{stage}: {len(data)} training examples ({data.name}), {len(eval_data)} for evaluation "
      f"({eval_data.name}).")
  cfg = model_lib.ModelConfig.from_config(config)
  if stage == "pretrain" and cfg.num_classes:
    raise UserError("Pretraining takes model.num_classes=0; the class head belongs to finetune.")
  if stage == "finetune":
    data.require_classes("Fine-tuning")
    cfg = dataclasses.replace(cfg, num_classes=data.num_classes)

  trainer = train_lib.Trainer(cfg, config, mesh, rules, stage=stage)
  tcfg = trainer.train_cfg
  if trainer.undivided:
    log(f"warning: {trainer.undivided}")
  tokenizer = transform.Tokenizer(centers, config.data.resolution, mesh, rules)
  head_fit = None
  ckpt = checkpoint_lib.Checkpointer(workdir_lib.checkpoint_dir(workdir, stage),
                                     keep=config.checkpoint.keep)
  distributed.agree(f"{stage}_checkpoint_steps", str(ckpt.all_steps()),
                    f"the checkpoint steps in {ckpt.directory}")
  palette_file = workdir_lib.palette_path(config, workdir)
  timeline.switch("restore")
  restored = ckpt.restore_latest(
      trainer.abstract_state, config=config.to_dict(), log=log,
      check_meta=lambda meta: workdir_lib.check_checkpoint(meta, cfg, centers, ckpt.directory,
                                                           palette_file))
  timeline.describe(restored_step=restored[0] if restored else 0)  # steps after it: lost
  if restored is not None:
    start, state, _ = restored
    log(f"Resumed from checkpoint step {start} in {ckpt.directory}.")
  else:
    start, state = 0, trainer.init_state(config.seed)
    if stage == "pretrain" and config.init_from:  # continued training of released weights
      from igpt_jax import released
      state["params"] = released.params(config, cfg, mesh, rules, log=log)
    if stage == "finetune":
      _, pretrained, _, _ = workdir_lib.load_pretrained(config, workdir, mesh, rules, log=log)
      for key in optim.HEAD:  # zero-initialised, as released
        pretrained[key] = state["params"][key]
      if config.finetune.head_init == "probe":
        from igpt_jax import probe as probe_lib
        timeline.switch("head_probe")
        pretrained, head_fit = head_lib.fit(trainer, pretrained,
                                            probe_lib.labelled_splits(config, log), tokenizer,
                                            config, log)
      state["params"] = pretrained
    log(f"{stage}: {model_lib.count_params(cfg):,} parameters on mesh {dict(mesh.shape)}"
        f"{f' over {jax.process_count()} processes' if jax.process_count() > 1 else ''}.")
  total, writer = tcfg.steps, None
  try:
    preemption.check(stage, step=start)  # a stop during restore or set-up: nothing to save yet
    if start >= total:
      timeline.switch("evaluation")
      result = _finished(trainer, state, start, config, workdir, eval_data, test_data,
                         tokenizer, log)
      ckpt.close()
      timeline.switch("after_training")
      return result
    writer = metrics_lib.MetricsWriter(workdir_lib.stage_dir(workdir, stage),
                                       enabled=distributed.is_chief(), namespace=stage)
    writer.truncate_after(start)
    timeline.switch("compile")
    step_fn = trainer.compile_step()
    mem = train_lib.memory_report(step_fn)
    if mem:
      log(f"Train step compiled: {mem['per_device_bytes'] / 2**20:.1f} MiB per device.")
    log(f"{stage}: attention {cfg.attention_on(attention_lib.mesh_platform(mesh))}.")
    preemption.check(stage, step=start)  # a stop during compilation
    if head_fit is not None and tcfg.eval_every:  # where LP-FT starts: the probe's accuracy
      timeline.switch("evaluation")
      scalars = {f"head_probe_{k}": v for k, v in head_fit.items()}
      scalars.update(evaluate(trainer, state["params"], eval_data, tokenizer, config,
                              tcfg.eval_batches))
      writer.write(0, scalars)
      head_fit["start_eval_accuracy"] = scalars.get("eval_accuracy")
      log("step 0 (the probe's head): " + metrics_lib.scalars_text(
          {k: v for k, v in scalars.items() if k.startswith("eval_")}))
  except BaseException:
    if writer is not None:
      writer.close()
    ckpt.close()
    raise

  rows = sharding_lib.host_rows(mesh, rules, tcfg.batch_size)
  batches = pipeline.train_batches(
      data, batch_size=tcfg.batch_size, seed=config.seed, start_step=start,
      num_steps=max(total - start, 0), rows=rows, augment=config.data.augment,
      crop_min=config.data.crop_min, prefetch=config.data.prefetch,
      pipeline=config.data.pipeline, log=log)

  progress = metrics_lib.Progress(total, start, log=log if distributed.is_chief() else None)
  flops_per_token = model_lib.flops_per_token(cfg)
  device_kind = jax.devices()[0].device_kind
  tokens_per_step = tcfg.batch_size * cfg.seq_len
  last_log_time, last_log_step = time.perf_counter(), start
  step, summary = start, {}
  last_grid_end = time.perf_counter()
  profiler = Profiler(tcfg.profile_steps, workdir_lib.path(workdir) / "profile",
                      distributed.is_chief() or tcfg.profile_all_hosts, log)
  watchdog = Watchdog(tcfg.watchdog_factor, log=log)
  input_s = 0.0  # this host's own time per log interval: reading and assembling its rows
  # The device's progress: step s is waited for once step s + 1 is queued behind it (so the
  # device never idles for it), and only then does the watchdog hear of it.
  wait_each_step, previous = one_in_flight(mesh), None
  signalled = False
  timeline.switch("steps")
  try:
    with watchdog:
      for step in range(start + 1, total + 1):
        profiler.before(step)
        began = time.perf_counter()
        g = sharding_lib.global_batch({k: v for k, v in next(batches).items() if k != "step"},
                                      mesh, rules, tcfg.batch_size)
        waited_for_input = time.perf_counter() - began
        input_s += waited_for_input
        timeline.count_step(step, waited_for_input)
        g["tokens"] = tokenizer(g.pop("images"), g.pop("boxes"))
        state, out = step_fn(state, {k: g[k] for k in trainer.batch_keys()})
        if previous is not None:  # the step before this one, finished on the device
          jax.block_until_ready(previous[1])
          watchdog.beat(previous[0])
        previous = (step, out["loss"])
        if wait_each_step:  # and on a CPU mesh this one too
          jax.block_until_ready(out["loss"])
          watchdog.beat(step)
          previous = None
        profiler.after(step, state)
        is_last = step == total
        signalled = preemption.should_stop()  # every process, every step
        preempted = step == stop_after or signalled
        eval_due = _eval_due(trainer, step, is_last)
        if step % tcfg.log_every == 0 or is_last or eval_due:  # evaluations on their own steps
          _stop_if_nonfinite(out, step, tcfg.max_nonfinite_steps, ckpt)
          loss = float(out["loss"])  # waits for the step
          if previous is not None:
            watchdog.beat(step)
            previous = None
          timeline.switch("steps")  # a span per log interval: a killed run loses at most one
          now = time.perf_counter()
          steps_done = max(step - last_log_step, 1)
          tokens_per_s = tokens_per_step * steps_done / max(now - last_log_time, 1e-9)
          hosts = metrics_lib.host_times((now - last_log_time) / steps_done, input_s / steps_done)
          last_log_time, last_log_step, input_s = now, step, 0.0
          scalars = {"loss": loss, "bits_per_dim": objectives.bits_per_dim(
                         float(out.get("gen_loss", loss)), config.data.channels),
                     **{k: float(out[k]) for k in ("grad_norm", "lr", "clf_loss", "accuracy",
                                                   "skipped") if k in out},
                     "tokens_per_s": tokens_per_s, "step_s": watchdog.median(),
                     "mfu": metrics_lib.mfu(tokens_per_s, flops_per_token, device_kind,
                                            len(jax.devices())), **hosts}
          if jax.process_count() > 1 and distributed.is_chief():
            log(metrics_lib.host_times_line(hosts))
          if not preempted:  # a preempted step saves first: no evaluation in the grace time
            with watchdog.paused(), timeline.during("evaluation"):
              try:
                scalars.update(_evaluations(trainer, state["params"], step, is_last, eval_data,
                                            test_data, tokenizer, config))
              except distributed.Preempted:  # stopped mid-evaluation: save this step
                preempted = signalled = True
          writer.write(step, scalars)
          progress.update(step, scalars)
          summary = scalars
        if (stage == "pretrain" and cfg.causal and tcfg.sample_every and not preempted
            and (step % tcfg.sample_every == 0 or is_last)):
          began = time.perf_counter()
          with watchdog.paused(), timeline.during("sample_grid"):
            writer.write_image(step, "samples", _sample_grid(trainer, state["params"], centers,
                                                             config, step))
          spent = time.perf_counter() - began
          since = max(began - last_grid_end, 1e-9)
          last_grid_end = time.perf_counter()
          log(f"Sample grid at step {step}: {spent:.1f} s, {100 * spent / since:.0f}% of the "
              f"{since:.0f} s trained since the last one (train.sample_every=0 turns it off).")
        if step % config.checkpoint.every == 0 or is_last or preempted:
          _stop_if_nonfinite(out, step, tcfg.max_nonfinite_steps, ckpt)
          if preempted:
            timeline.note("preempted", step=step)
          with timeline.during("checkpoint"):
            ckpt.save(step, state, checkpoint_meta(
                config, cfg, centers, data.class_names if stage == "finetune" else None))
          writer.flush()  # on object stores: the rows and spans up to the checkpoint
          timeline.flush()
        if preempted:
          log(f"Stopping early: saved step {step}." if not signalled else
              f"Preemption signal: saved step {step}, exiting with status "
              f"{distributed.EXIT_PREEMPTED} (run the same command again to resume).")
          break
  finally:
    timeline.switch("checkpoint")  # the last saves' wait
    profiler.close()
    batches.close()  # stops the read-ahead thread
    progress.close()
    writer.close()
    ckpt.close()
    timeline.switch("after_training")
  report = timeline.report()
  if report is not None:
    log(f"{stage}: {goodput.text(report)} ({goodput.report_path(workdir)})")
  result = _result(stage, step, workdir, summary, head_fit)
  if signalled and (step < total or not _has_final(result, trainer)):
    raise distributed.Preempted(result)  # saved, not done: the caller exits 75
  if step == total:
    workdir_lib.write_json(workdir_lib.result_path(workdir, stage), result)
  return result


def _eval_due(trainer, step: int, is_last: bool) -> bool:
  """Validation every eval_every steps and at the end, whatever log_every is (a step that
  evaluates is logged too)."""
  every = trainer.train_cfg.eval_every
  return bool(every) and (step % every == 0 or is_last)


def _evaluations(trainer, params, step: int, is_last: bool, eval_data, test_data, tokenizer,
                 config) -> dict:
  """The evaluations due at `step`: validation (`_eval_due`); for fine-tuning, the test split
  at the end (the final number)."""
  out = {}
  if _eval_due(trainer, step, is_last):
    out.update(evaluate(trainer, params, eval_data, tokenizer, config,
                        trainer.train_cfg.eval_batches))
  if trainer.stage == "finetune" and is_last:
    out.update(evaluate(trainer, params, test_data(), tokenizer, config, prefix="test"))
  return out


def _has_final(result: dict, trainer) -> bool:
  """Whether a last step's result holds the evaluations due at the end."""
  if trainer.train_cfg.eval_every and "eval_loss" not in result:
    return False
  return trainer.stage != "finetune" or "test_accuracy" in result


def _finished(trainer, state, start: int, config, workdir, eval_data, test_data, tokenizer,
              log) -> dict:
  """A stage already trained to its last step (or past it) reports its result: the one it
  wrote when it finished, or -- when that is missing or lacks the final evaluations (stopped
  during them) -- the last logged row with those evaluations run now on the saved state."""
  stage, total = trainer.stage, trainer.train_cfg.steps
  path = workdir_lib.result_path(workdir, stage)
  saved = json.loads(path.read_text()) if path.exists() else None
  usable = saved is not None and saved.get("step") == start and _has_final(saved, trainer)
  if not distributed.any_process(not usable):
    log(f"{stage}: already trained to step {start} (train.steps={total}); its result, from "
        f"{path}, follows.")
    return saved
  rows = metrics_lib.read_rows(workdir_lib.stage_dir(workdir, stage))
  last = next((r for r in reversed(rows) if r["step"] == start), {})
  first = next((r for r in rows if r["step"] == 0), {})
  log(f"{stage}: already trained to step {start} (train.steps={total}); evaluating the saved "
      "state for its result.")
  scalars = {**{k: v for k, v in last.items() if k != "step"},
             **_evaluations(trainer, state["params"], start, True, eval_data, test_data,
                            tokenizer, config)}
  head = {k[len("head_probe_"):]: v for k, v in first.items() if k.startswith("head_probe_")}
  result = _result(stage, start, workdir, scalars,
                   {**head, "start_eval_accuracy": first.get("eval_accuracy")} if head else None)
  workdir_lib.write_json(path, result)
  return result


def _result(stage: str, step: int, workdir, scalars: dict, head_fit: dict | None) -> dict:
  """A training stage's JSON line: where its checkpoints and metrics are, its last logged
  scalars, and LP-FT's head probe."""
  result = {"stage": stage, "step": step,
            "checkpoints": str(workdir_lib.checkpoint_dir(workdir, stage)),
            "metrics": str(workdir_lib.stage_dir(workdir, stage) / "metrics.jsonl"),
            **{k: v for k, v in scalars.items() if v is not None}}
  if head_fit is not None:
    result["head_probe"] = head_fit
  return result


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


def _stop_if_nonfinite(out: dict, step: int, limit: int, ckpt) -> None:
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


def _sample_grid(trainer: train_lib.Trainer, params, centers, config, step: int) -> np.ndarray:
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


def evaluate_stage(config, workdir, log=print) -> dict:
  """Stage evaluate: bits/dim of the pretrained model on the whole validation and test splits,
  reported separately (validation is what model choices may look at; test is the final
  number)."""
  from igpt_jax.data import sources, transform
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.rules_from_config(config)
  cfg, params, centers, step = workdir_lib.load_pretrained(config, workdir, mesh, rules, log=log)
  trainer = train_lib.Trainer(cfg, config, mesh, rules)
  tokenizer = transform.Tokenizer(centers, config.data.resolution, mesh, rules)
  result = {"stage": "evaluate", "checkpoint_step": step}
  roles = ("validation", "test") if sources.validation_fraction(config) > 0 else ("test",)
  for role in roles:
    data = sources.load(config, role, log=log)
    result[f"{role}_examples"] = len(data)
    result.update(evaluate(trainer, params, data, tokenizer, config, prefix=role))
  path = workdir_lib.path(workdir) / "evaluate.json"
  workdir_lib.write_json(path, result)
  log("; ".join(f"{role} bits/dim {result[f'{role}_bits_per_dim']:.4f} "
                f"({result[f'{role}_loss']:.4f} nats/token)" for role in roles)
      + f"; written to {path}")
  return result
