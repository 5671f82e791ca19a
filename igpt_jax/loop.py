"""The training loop of pretrain and finetune: data in, checkpoints and metrics out, resumption,
preemption and the stop on non-finite steps.

`fit` reads as its phases: build the run (mesh, data, model, trainer), its start state (restore
| init | released weights | LP-FT head), the step loop, the result. Besides the step, the loop
calls its duties in turn (loop_duties: pace and watchdog, logging and evaluation, sample grids,
checkpoints, profiling).

Every process runs the same loop: it feeds the rows of each global batch that its devices hold
(sharding.host_rows), saves checkpoints together with the others (Orbax), and stops at the same
step as the others on preemption (distributed.PREEMPTION). Only process 0 writes metrics.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable

import jax

from igpt_jax import attention as attention_lib
from igpt_jax import checkpoint as checkpoint_lib
from igpt_jax import distributed
from igpt_jax import evaluation
from igpt_jax import goodput
from igpt_jax import head as head_lib
from igpt_jax import metrics as metrics_lib
from igpt_jax import model as model_lib
from igpt_jax import optim
from igpt_jax import sharding as sharding_lib
from igpt_jax import train as train_lib
from igpt_jax import workdir as workdir_lib
from igpt_jax.config import UserError
from igpt_jax.loop_duties import LogSteps, Pace, Profiler, SampleGrids, Saves
from igpt_jax.watchdog import Watchdog


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
    goodput.TIMELINE.begin(workdir, stage)
    run = build_run(config, workdir, stage, log)
    start, state, head_fit = start_state(run)
    writer = None
    try:
      distributed.PREEMPTION.check(stage, step=start)  # a stop during restore or set-up
      if start >= run.tcfg.steps:
        return _already_trained(run, state, start)
      writer = metrics_lib.MetricsWriter(workdir_lib.stage_dir(workdir, stage),
                                         enabled=distributed.is_chief(), namespace=stage)
      writer.truncate_after(start)
      step_fn = _compile(run)
      distributed.PREEMPTION.check(stage, step=start)  # a stop during compilation
      if head_fit is not None and run.tcfg.eval_every:
        _evaluate_head(run, state, head_fit, writer)
    except BaseException:
      if writer is not None:
        writer.close()
      run.ckpt.close()
      raise
    step, summary, signalled = train_steps(run, state, start, step_fn, writer, stop_after)
    return _result_of(run, step, summary, head_fit, signalled)


@dataclasses.dataclass
class Run:
  """What one training stage works with, built once by `build_run`."""
  config: Any
  workdir: Any
  stage: str
  log: Callable
  mesh: Any
  rules: Any
  centers: Any
  data: Any  # the training split (sources.ImageSet)
  eval_data: Any  # validation (or test, without validation)
  test_data: Callable  # the test split, loaded when a fine-tuning's end needs it
  cfg: model_lib.ModelConfig
  trainer: train_lib.Trainer
  tokenizer: Any
  ckpt: checkpoint_lib.Checkpointer

  @property
  def tcfg(self):
    return self.trainer.train_cfg

  @property
  def input_view(self) -> dict:
    """How the model sees an image at evaluation (the checkpoint records it for export)."""
    from igpt_jax.data import transform
    return transform.input_view(self.data, self.config.data.augment,
                                self.config.data.resolution)

  @property
  def split_rule(self) -> str:
    """How validation is held out of this run's train split (the checkpoint records it)."""
    from igpt_jax.data import sources
    return sources.split_rule(self.config)


def build_run(config, workdir, stage: str, log) -> Run:
  """The mesh, palette, data, model, trainer and checkpointer of `stage`."""
  from igpt_jax import palette as palette_lib
  from igpt_jax.data import sources, transform
  mesh = sharding_lib.make_mesh(config.mesh)  # first: a mesh that does not fit fails at once
  rules = sharding_lib.rules_from_config(config)
  centers = workdir_lib.load_palette(config, workdir)  # stages.pretrain fits one if missing
  data = sources.load(config, "pretrain" if stage == "pretrain" else "train", log=log)
  eval_data = evaluation.eval_split(config, log)
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
  if trainer.undivided:
    log(f"warning: {trainer.undivided}")
  ckpt = checkpoint_lib.Checkpointer(workdir_lib.checkpoint_dir(workdir, stage),
                                     keep=config.checkpoint.keep)
  distributed.agree(f"{stage}_checkpoint_steps", str(ckpt.all_steps()),
                    f"the checkpoint steps in {ckpt.directory}")
  return Run(config, workdir, stage, log, mesh, rules, centers, data, eval_data,
             lambda: sources.load(config, "test", log=log), cfg, trainer,
             transform.Tokenizer(centers, config.data.resolution, mesh, rules), ckpt)


def start_state(run: Run) -> tuple[int, dict, dict | None]:
  """(step, state, LP-FT head fit): the newest intact checkpoint's, else a fresh init --
  pretraining from released weights where init_from says so, fine-tuning from the pretrained
  parameters and a zero (or probe-fitted) class head."""
  config, stage, log, cfg = run.config, run.stage, run.log, run.cfg
  palette_file = workdir_lib.palette_path(config, run.workdir)
  goodput.TIMELINE.switch("restore")
  restored = run.ckpt.restore_latest(
      run.trainer.abstract_state, config=config.to_dict(), log=log,
      check_meta=lambda meta: (
          workdir_lib.check_checkpoint(meta, cfg, run.centers, run.ckpt.directory, palette_file),
          workdir_lib.check_split_rule(meta, run.split_rule, run.ckpt.directory)))
  goodput.TIMELINE.describe(restored_step=restored[0] if restored else 0)  # after it: lost
  if restored is not None:
    start, state, _ = restored
    log(f"Resumed from checkpoint step {start} in {run.ckpt.directory}.")
    return start, state, None
  state, head_fit = run.trainer.init_state(config.seed), None
  if stage == "pretrain" and config.init_from:  # continued training of released weights
    from igpt_jax import released
    state["params"] = released.params(config, cfg, run.mesh, run.rules, log=log)
  if stage == "finetune":
    _, pretrained, _, _ = workdir_lib.load_pretrained(config, run.workdir, run.mesh, run.rules,
                                                      log=log)
    for key in optim.HEAD & set(state["params"]):  # zero-initialised, as released
      pretrained[key] = state["params"][key]
    if config.finetune.head_init == "probe":
      from igpt_jax import probe as probe_lib
      goodput.TIMELINE.switch("head_probe")
      pretrained, head_fit = head_lib.fit(run.trainer, pretrained,
                                          probe_lib.labelled_splits(config, log), run.tokenizer,
                                          config, log)
    state["params"] = pretrained
  log(f"{stage}: {model_lib.count_params(cfg):,} parameters on mesh {dict(run.mesh.shape)}"
      f"{f' over {jax.process_count()} processes' if jax.process_count() > 1 else ''}.")
  return 0, state, head_fit


def _compile(run: Run):
  goodput.TIMELINE.switch("compile")
  step_fn = run.trainer.compile_step()
  mem = train_lib.memory_report(step_fn)
  if mem:
    run.log(f"Train step compiled: {mem['per_device_bytes'] / 2**20:.1f} MiB per device.")
  run.log(f"{run.stage}: attention {run.cfg.attention_on(attention_lib.mesh_platform(run.mesh))}.")
  return step_fn


def _evaluate_head(run: Run, state, head_fit: dict, writer) -> None:
  """Where LP-FT starts: the probe's accuracy, as metrics row 0."""
  goodput.TIMELINE.switch("evaluation")
  scalars = {f"head_probe_{k}": v for k, v in head_fit.items()}
  scalars.update(evaluation.evaluate(run.trainer, state["params"], run.eval_data, run.tokenizer,
                                     run.config, run.tcfg.eval_batches))
  writer.write(0, scalars)
  head_fit["start_eval_accuracy"] = scalars.get("eval_accuracy")
  run.log("step 0 (the probe's head): " + metrics_lib.scalars_text(
      {k: v for k, v in scalars.items() if k.startswith("eval_")}))


def _already_trained(run: Run, state, start: int) -> dict:
  goodput.TIMELINE.switch("evaluation")
  result = _finished(run.trainer, state, start, run.config, run.workdir, run.eval_data,
                     run.test_data, run.tokenizer, run.log)
  run.ckpt.close()
  goodput.TIMELINE.switch("after_training")
  return result


def train_steps(run: Run, state, start: int, step_fn, writer, stop_after: int | None):
  """The step loop: feed, step, then each duty in turn; -> (last step, last logged scalars,
  whether a signal stopped it). A stop saves the step it is at and ends the loop."""
  from igpt_jax.data import pipeline
  config, tcfg, log, total = run.config, run.tcfg, run.log, run.tcfg.steps
  preemption, timeline = distributed.PREEMPTION, goodput.TIMELINE
  rows = sharding_lib.host_rows(run.mesh, run.rules, tcfg.batch_size)
  batches = pipeline.train_batches(
      run.data, batch_size=tcfg.batch_size, seed=config.seed, start_step=start,
      num_steps=max(total - start, 0), rows=rows, augment=config.data.augment,
      crop_min=config.data.crop_min, prefetch=config.data.prefetch,
      pipeline=config.data.pipeline, stage=run.stage, log=log)
  watchdog = Watchdog(tcfg.watchdog_factor, log=log)
  pace = Pace(watchdog, run.mesh)
  logger = LogSteps(run, writer, start, pace, watchdog)
  grids, saves = SampleGrids(run, writer, watchdog), Saves(run, writer)
  profiler = Profiler(tcfg.profile_steps, workdir_lib.path(run.workdir) / "profile",
                      distributed.is_chief() or tcfg.profile_all_hosts, log)
  step, signalled = start, False
  timeline.switch("steps")
  try:
    with watchdog:
      for step in range(start + 1, total + 1):
        profiler.before(step)
        state, out = step_fn(state, _next_batch(run, batches, step, logger))
        pace.dispatched(step, out["loss"])
        profiler.after(step, state)
        is_last = step == total
        signalled = preemption.should_stop()  # every process, every step
        preempted = step == stop_after or signalled
        if logger.due(step, is_last) and logger(step, out, state["params"], is_last, preempted):
          preempted = signalled = True  # stopped mid-evaluation: save this step
        grids(step, state["params"], is_last, preempted)
        saves(step, state, out, is_last, preempted)
        if preempted:
          log(f"Stopping early: saved step {step}." if not signalled else
              f"Preemption signal: saved step {step}, exiting with status "
              f"{distributed.EXIT_PREEMPTED} (run the same command again to resume).")
          break
  finally:
    timeline.switch("checkpoint")  # the last saves' wait
    profiler.close()
    batches.close()  # stops the read-ahead thread
    logger.close()
    writer.close()
    run.ckpt.close()
    timeline.switch("after_training")
  return step, logger.summary, signalled


def _next_batch(run: Run, batches, step: int, logger: LogSteps) -> dict:
  """This host's rows of the next batch, assembled into the global batch and tokenized; the
  time the host waited for them is counted (goodput, the per-host input times)."""
  began = time.perf_counter()
  g = sharding_lib.global_batch({k: v for k, v in next(batches).items() if k != "step"},
                                run.mesh, run.rules, run.tcfg.batch_size)
  waited = time.perf_counter() - began
  logger.waited_for_input(waited)
  goodput.TIMELINE.count_step(step, waited)
  g["tokens"] = run.tokenizer(g.pop("images"), g.pop("boxes"))
  return {k: g[k] for k in run.trainer.batch_keys()}


def _result_of(run: Run, step: int, summary: dict, head_fit, signalled: bool) -> dict:
  report = goodput.TIMELINE.report()
  if report is not None:
    run.log(f"{run.stage}: {goodput.text(report)} ({goodput.report_path(run.workdir)})")
  result = _result(run.stage, step, run.workdir, summary, head_fit)
  if signalled and (step < run.tcfg.steps or not evaluation.has_final(result, run.trainer)):
    raise distributed.Preempted(result)  # saved, not done: the caller exits 75
  if step == run.tcfg.steps:
    workdir_lib.write_json(workdir_lib.result_path(run.workdir, run.stage), result)
  return result


def _finished(trainer, state, start: int, config, workdir, eval_data, test_data, tokenizer,
              log) -> dict:
  """A stage already trained to its last step (or past it) reports its result: the one it
  wrote when it finished, or -- when that is missing or lacks the final evaluations (stopped
  during them) -- the last logged row with those evaluations run now on the saved state."""
  stage, total = trainer.stage, trainer.train_cfg.steps
  path = workdir_lib.result_path(workdir, stage)
  saved = json.loads(path.read_text()) if path.exists() else None
  usable = saved is not None and saved.get("step") == start and evaluation.has_final(saved, trainer)
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
             **evaluation.evaluations_due(trainer, state["params"], start, True, eval_data, test_data,
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
