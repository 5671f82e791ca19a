"""Sharded pretraining: mesh equivalence, bit-exact resume, kills, corrupt checkpoints, planning."""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, xla_flags
from igpt_jax import checkpoint as checkpoint_lib
from igpt_jax import evaluation, loop, loop_duties
from igpt_jax.stages import pretrain as pretrain_stage
from igpt_jax import model as model_lib
from igpt_jax import sharding as sharding_lib
from igpt_jax import train as train_lib
from igpt_jax.config import UserError
from igpt_jax.data import sources
from test_model import load_config

needs_fmnist = pytest.mark.skipif(sources.fashion_mnist_dir() is None,
                                  reason="Debian's dataset-fashion-mnist is not installed")

# A tiny demo: 2 layers of width 32 on 8x8 Fashion-MNIST (64 tokens an image: the stage tests
# evaluate whole 10k splits, whose cost grows with the square of the sequence); every step logged.
TINY_OVERRIDES = ["--config.data.resolution=8", "--config.model.num_layers=2",
                  "--config.model.d_model=32", "--config.model.num_heads=4",
                  "--config.train.batch_size=16", "--config.train.log_every=1",
                  "--config.train.eval_every=0", "--config.palette.samples=20000",
                  "--config.palette.iters=5", "--config.train.sample_every=0"]


def tiny_config(**train):
  config = load_config("demo")
  config.stage = "pretrain"
  config.data.resolution = 8
  config.model.num_layers, config.model.d_model, config.model.num_heads = 2, 32, 4
  config.palette.samples, config.palette.iters = 20_000, 5
  config.train.batch_size, config.train.log_every, config.train.eval_every = 16, 1, 0
  config.train.sample_every = 0  # tests/test_metrics.py covers the sample grids
  for key, value in train.items():
    setattr(config.train, key, value)
  return config


@pytest.mark.parametrize("mesh,model", [
    (dict(data=8, fsdp=1, tensor=1), {}), (dict(data=1, fsdp=8, tensor=1), {}),
    (dict(data=1, fsdp=4, tensor=2), {}),
    (dict(data=1, fsdp=4, tensor=2), dict(fused_qkv=True, scan_layers=False))])
def test_same_losses_on_one_device_and_on_a_mesh(mesh, model):
  config = tiny_config(steps=5, batch_size=8, warmup_steps=2, lr=3e-3)
  config.data.resolution, config.palette.k = 4, 16
  config.model.update(model)
  cfg = model_lib.ModelConfig.from_config(config)
  # One fixed batch, so that the loss also has to fall.
  tokens = jnp.broadcast_to(jax.random.randint(jax.random.key(0), (8, cfg.seq_len), 0,
                                               cfg.vocab_size), (5, 8, cfg.seq_len))

  def losses(devices, mesh_sizes):
    for axis, size in mesh_sizes.items():
      setattr(config.mesh, axis, size)
    trainer = train_lib.Trainer(cfg, config, sharding_lib.make_mesh(config.mesh, devices),
                                sharding_lib.DEFAULT_RULES)
    step, state, out = trainer.compile_step(), trainer.init_state(0), []
    for i in range(5):
      batch = {"tokens": jax.device_put(tokens[i], trainer.batch_sharding)}
      state, metrics = step(state, batch)
      out.append(float(metrics["loss"]))
    return np.array(out), state

  single, _ = losses(jax.devices()[:1], dict(data=1, fsdp=1, tensor=1))
  sharded, state = losses(jax.devices()[:8], mesh)
  assert len(jax.devices()) == 8
  if mesh["fsdp"] > 1:  # the weights really are split
    assert not state["params"]["blocks"]["fc"].sharding.is_fully_replicated
  np.testing.assert_allclose(sharded, single, rtol=1e-5)
  assert single[-1] < single[0]


NO_REMAT_SCRIPT = """
import sys
import jax
from igpt_jax import config as config_lib, plan_compile
for objective, sizes in [(o, s) for o in ("ar", "bert") for s in sys.argv[1:]]:
  config = config_lib.load_config_file("configs/demo.py")
  data, fsdp, tensor = map(int, sizes.split("x"))
  config = plan_compile.with_overrides(config, {"mesh.data": data, "mesh.fsdp": fsdp,
                                                "mesh.tensor": tensor, "model.objective": objective})
  plan_compile.compile_step(config, jax.devices()[:data * fsdp * tensor])
  print("compiled", objective, sizes, flush=True)
"""


def test_no_involuntary_rematerialization_on_the_meshes_plan_suggests():
  """XLA's SPMD partitioner says "Involuntary full rematerialization" when a sharding cannot be
  reached efficiently and it replicates the tensor on every device instead (it did, for the
  batch-split gradient of an embedding looked up in an FSDP-split table). The demo's step, AR
  and BERT, on data x fsdp, fsdp x tensor and data x fsdp x tensor meshes: none."""
  env = {**os.environ, "XLA_FLAGS": xla_flags(8), "TF_CPP_MIN_LOG_LEVEL": "0",
         "JAX_ENABLE_COMPILATION_CACHE": "false"}  # a cache hit would compile (and warn) nothing
  proc = subprocess.run([sys.executable, "-c", NO_REMAT_SCRIPT, "2x2x1", "1x2x2", "2x2x2"],
                        capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("compiled") == 6, proc.stdout
  remats = [line for line in proc.stderr.splitlines() if "Involuntary" in line]
  assert not remats, remats[0][:600]


def test_gradient_accumulation_matches_one_big_batch():
  config = tiny_config(steps=3, batch_size=8, warmup_steps=1)
  config.data.resolution = 4
  cfg = model_lib.ModelConfig.from_config(config)
  tokens = jax.random.randint(jax.random.key(1), (8, cfg.seq_len), 0, cfg.vocab_size)
  mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:1])
  results = []
  for accum in (1, 4):
    config.train.accum_steps = accum
    trainer = train_lib.Trainer(cfg, config, mesh, sharding_lib.DEFAULT_RULES)
    state, metrics = trainer.compile_step()(trainer.init_state(0), {"tokens": tokens})
    results.append((float(metrics["loss"]), state["params"]["blocks"]["fc"]))
  np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5)
  np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


@needs_fmnist
def test_resume_is_bit_exact(tmp_path):
  config = tiny_config(steps=20, warmup_steps=5)
  config.checkpoint.every = 7  # the interruption at 10 is not on a checkpoint interval
  pretrain_stage.run(config, str(tmp_path / "straight"), log=lambda *_: None)
  pretrain_stage.run(config, str(tmp_path / "resumed"), log=lambda *_: None, stop_after=10)
  logs = []
  pretrain_stage.run(config, str(tmp_path / "resumed"), log=logs.append)
  assert any("Resumed from checkpoint step 10" in line for line in logs)
  assert "pretrain: attention blocked (auto on cpu)." in logs  # the default, resolved and said
  a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
  assert [r["step"] for r in b] == list(range(1, 21))
  assert [r["loss"] for r in a] == [r["loss"] for r in b]

  def final_params(workdir):
    trainer = train_lib.Trainer(model_lib.ModelConfig.from_config(config), config,
                                sharding_lib.make_mesh(config.mesh), sharding_lib.DEFAULT_RULES)
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints", "pretrain"))
    step, state, _ = ckpt.restore_latest(trainer.abstract_state)
    ckpt.close()
    assert step == 20
    return state["params"]

  for x, y in zip(jax.tree.leaves(final_params(tmp_path / "straight")),
                  jax.tree.leaves(final_params(tmp_path / "resumed")), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def start_training(workdir, steps, every, extra=()):
  cmd = [sys.executable, "-u", "-m", "igpt_jax.main", f"--config={REPO}/configs/demo.py",
         "--config.stage=pretrain", f"--workdir={workdir}", f"--config.train.steps={steps}",
         f"--config.checkpoint.every={every}", *TINY_OVERRIDES, *extra]
  env = {**os.environ, "XLA_FLAGS": xla_flags()}
  return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=REPO, env=env)


def wait_until(reached, proc, what, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if reached():
      return
    if proc.poll() is not None:
      raise AssertionError(f"training exited early:\n{proc.stdout.read()[-3000:]}")
    time.sleep(0.2)
  raise AssertionError(f"training did not reach {what} in time")


def wait_for_step(workdir, step, proc, timeout=240):
  path = os.path.join(workdir, "metrics.jsonl")
  def reached():
    rows = read_metrics(workdir) if os.path.exists(path) else []  # one read: it may change
    return bool(rows) and rows[-1]["step"] >= step
  wait_until(reached, proc, f"step {step}", timeout)


@needs_fmnist
def test_sigkill_resumes_and_sigterm_saves_then_exits_cleanly(tmp_path):
  workdir = str(tmp_path)
  proc = start_training(workdir, steps=10_000, every=3)
  ckpt_dir = os.path.join(workdir, "checkpoints", "pretrain")
  wait_for_step(workdir, 7, proc)
  # Saves are asynchronous: step 6's may still be in flight at step 7. Kill once Orbax has
  # committed it (the step's directory gets its final name last).
  wait_until(lambda: os.path.isdir(os.path.join(ckpt_dir, "6")), proc, "a committed step 6")
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  saved = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  assert saved and saved[-1] >= 6
  # The killed run may have logged steps past the newest save; wait for a step only the resumed
  # run can log, or the SIGTERM below could land before it has even installed its handler.
  logged_by_killed_run = read_metrics(workdir)[-1]["step"]

  proc = start_training(workdir, steps=10_000, every=1000)
  wait_for_step(workdir, logged_by_killed_run + 2, proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 75, out[-3000:]  # saved after a preemption: run it again
  assert json.loads([l for l in out.splitlines() if l.startswith("{")][-1])["preempted"] is True
  assert f"Resumed from checkpoint step {saved[-1]}" in out
  last_logged = read_metrics(workdir)[-1]["step"]
  final = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  assert final == last_logged and final > saved[-1]
  assert "Preemption signal: saved step" in out

  # Loss for loss, the killed-resumed-preempted run is an uninterrupted one (same palette; this
  # process's 8 devices against the CLI's 1, hence a tolerance rather than equality).
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == list(range(1, final + 1))  # the killed run's extra lines gone
  straight = tmp_path / "straight"
  straight.mkdir()
  shutil.copy(tmp_path / "palette.npz", straight / "palette.npz")
  config = tiny_config(steps=10_000)
  config.checkpoint.every = 1000
  pretrain_stage.run(config, str(straight), log=lambda *_: None, stop_after=final)
  np.testing.assert_allclose([r["loss"] for r in rows],
                             [r["loss"] for r in read_metrics(straight)], rtol=1e-5)


@needs_fmnist
def test_ctrl_c_saves_the_step_and_exits_75_like_a_preemption(tmp_path):
  """Ctrl-C in a foreground run is a preemption: the step is saved, one line says so, exit 75
  (and the same command resumes); not a KeyboardInterrupt traceback with the work lost."""
  proc = start_training(str(tmp_path), steps=10_000, every=1000)
  wait_for_step(str(tmp_path), 3, proc)
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 75, out[-3000:]
  assert "Traceback" not in out and "KeyboardInterrupt" not in out
  assert "pretrain: stopped (SIGINT)" in out
  saved = [int(d) for d in os.listdir(tmp_path / "checkpoints" / "pretrain") if d.isdigit()]
  assert saved == [read_metrics(tmp_path)[-1]["step"]]


@needs_fmnist
def test_a_streak_between_two_log_steps_stops_the_run(tmp_path, monkeypatch):
  """NaN at steps 2-6, a good step 7, logs every 10: the streak of 5 ended before anyone
  looked, and still stops the run at step 10 (max_nonfinite_steps=3)."""
  config = tiny_config(steps=30, warmup_steps=1, max_nonfinite_steps=3, log_every=10)
  config.checkpoint.every = 1000
  real_loss = train_lib.Trainer.loss_fn
  bad_keys = jnp.stack([jax.random.key_data(jax.random.fold_in(jax.random.key(config.seed), s))
                        for s in range(1, 6)])  # the step rng of steps 2..6 (state step 1..5)

  def poisoned(self, params, batch, rng):
    loss, aux = real_loss(self, params, batch, rng)
    bad = jnp.any(jnp.all(bad_keys == jax.random.key_data(rng), axis=-1))
    return loss * jnp.where(bad, jnp.nan, 1.0), aux

  monkeypatch.setattr(train_lib.Trainer, "loss_fn", poisoned)
  with pytest.raises(loop_duties.NonFiniteLoss, match=r"5 steps in a row by step 10 "):
    pretrain_stage.run(config, str(tmp_path), log=lambda *_: None)


@needs_fmnist
def test_sigterm_during_all_exits_75_after_a_save_and_starts_no_later_stage(tmp_path):
  """A supervisor must tell "preempted" from "done": exit 75, a checkpoint of the step, no
  evaluation or sample grid spent at that step, and no evaluate/probe/finetune/sample after."""
  workdir = str(tmp_path)
  proc = start_training(workdir, steps=10_000, every=1000,
                        extra=["--config.stage=all", "--config.train.eval_every=1",
                               "--config.train.eval_batches=1"])
  wait_for_step(workdir, 3, proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=180)
  assert proc.returncode == 75, out[-3000:]
  saved = os.listdir(os.path.join(workdir, "checkpoints", "pretrain"))
  records = read_metrics(workdir)
  assert saved == [str(records[-1]["step"])]
  assert "eval_loss" in records[-2] and "eval_loss" not in records[-1]  # saved first
  assert "=== evaluate ===" not in out and "Sample grid" not in out
  assert not {"evaluate.json", "probe", "finetune", "samples", "report.md"} & set(os.listdir(workdir))


@needs_fmnist
def test_truncated_newest_checkpoint_falls_back_with_a_warning(tmp_path):
  workdir = str(tmp_path)
  proc = start_training(workdir, steps=6, every=3)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  newest = os.path.join(workdir, "checkpoints", "pretrain", "6")
  files = [os.path.join(d, f) for d, _, fs in os.walk(newest) for f in fs]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  proc = start_training(workdir, steps=6, every=3)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert f"checkpoint {newest} is unreadable" in out and "moved to" in out
  assert "Resumed from checkpoint step 3" in out


@needs_fmnist
def test_checkpoint_of_another_model_or_optimizer_is_refused_and_left_in_place(tmp_path):
  config = tiny_config(steps=2)
  pretrain_stage.run(config, str(tmp_path), log=lambda *_: None)
  ckpt_dir = tmp_path / "checkpoints" / "pretrain"
  before = sorted(os.listdir(ckpt_dir))
  wider = tiny_config(steps=4)
  wider.model.d_model = 64
  with pytest.raises(checkpoint_lib.CheckpointMismatch,
                     match="different model: d_model saved 32 vs configured 64"):
    pretrain_stage.run(wider, str(tmp_path), log=lambda *_: None)
  # No clipping: optax's chain loses a state entry, so the optimizer-state tree differs.
  unclipped = tiny_config(steps=4, grad_clip=0.0)
  with pytest.raises(checkpoint_lib.CheckpointMismatch,
                     match=r"different optimizer state than the config makes \(train.grad_clip "
                           r"saved 1.0 vs configured 0.0\): set it back to resume this run, or use "
                           r"a new --workdir"):
    pretrain_stage.run(unclipped, str(tmp_path), log=lambda *_: None)
  assert sorted(os.listdir(ckpt_dir)) == before == ["2"]


def test_restore_error_that_is_not_damage_stops_and_touches_nothing(tmp_path, monkeypatch):
  config, trainer = one_device_trainer(steps=2)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path))
  ckpt.retry_wait_s = 0.01
  ckpt.save(1, trainer.init_state(0), {"config": config.to_dict()})
  ckpt.wait()

  def out_of_memory(*args, **kwargs):
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.1GiB.")
  monkeypatch.setattr(ckpt.manager, "restore", out_of_memory)
  with pytest.raises(checkpoint_lib.RestoreFailed, match="RESOURCE_EXHAUSTED.*nothing was changed"):
    ckpt.restore_latest(trainer.abstract_state)
  assert os.listdir(tmp_path) == ["1"]
  assert checkpoint_lib.is_damage(ValueError("DATA_LOSS: Error reading chunk: unexpected end"))
  assert not checkpoint_lib.is_damage(OSError("PERMISSION_DENIED: 403 from storage"))
  # Orbax says "not found" and the storage cannot serve a file (a link to nowhere, as a mount
  # or a bucket this host does not see): not damage, the step stays where it is.
  monkeypatch.undo()
  victim = max((p for p in (tmp_path / "1").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  victim.unlink()
  victim.symlink_to(tmp_path / "elsewhere" / victim.name)
  with pytest.raises(checkpoint_lib.RestoreFailed, match="the storage does not serve "
                     r"checkpoint step 1 here \(FileNotFoundError"):
    ckpt.restore_latest(trainer.abstract_state)
  assert os.listdir(tmp_path) == ["1"]


def one_device_trainer(**train):
  """(config, trainer) of a tiny model (4x4 images, 16 colours) on one device."""
  config = tiny_config(**train)
  config.data.resolution, config.palette.k = 4, 16
  trainer = train_lib.Trainer(model_lib.ModelConfig.from_config(config), config,
                              sharding_lib.make_mesh(config.mesh, jax.devices()[:1]),
                              sharding_lib.DEFAULT_RULES)
  return config, trainer


def poisoned_step(monkeypatch, **train):
  """(trainer, compiled step, a good batch, a batch with a NaN loss) of `one_device_trainer`:
  a batch whose first token is 7 gets a NaN loss, hence NaN gradients."""
  poison = 7
  real_loss = train_lib.objectives.ar_loss
  monkeypatch.setattr(train_lib.objectives, "ar_loss", lambda logits, tokens: real_loss(
      logits, tokens) * jnp.where(tokens[0, 0] == poison, jnp.nan, 1.0))
  _, trainer = one_device_trainer(batch_size=8, **train)
  good = jax.random.randint(jax.random.key(0), (8, trainer.cfg.seq_len), 0, poison)
  return trainer, trainer.compile_step(), good, good.at[0, 0].set(poison)


def test_step_with_nonfinite_gradient_is_not_applied(monkeypatch):
  trainer, step, good, bad = poisoned_step(monkeypatch, steps=10, warmup_steps=1)
  state, out = step(trainer.init_state(0), {"tokens": good})
  assert int(out["skipped"]) == 0 and int(state["nonfinite_streak"]) == 0
  before = jax.tree.map(np.asarray, state)
  state, out = step(state, {"tokens": bad})
  assert int(out["skipped"]) == 1 and int(state["nonfinite_streak"]) == 1
  assert int(state["step"]) == 2  # the data order moves on; the model does not
  for a, b in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(state["params"]), strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))
  for a, b in zip(jax.tree.leaves(before["opt_state"]), jax.tree.leaves(state["opt_state"]), strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))
  state, out = step(state, {"tokens": good})
  assert int(out["skipped"]) == 0 and int(state["nonfinite_streak"]) == 0
  assert not np.array_equal(np.asarray(state["params"]["head"]), before["params"]["head"])


def test_the_learning_rate_follows_the_step_through_skipped_steps(monkeypatch):
  """Steps 1 and 2 are skipped (NaN loss) at the start of a 4-step warmup: step 3 applies the
  schedule's value at step 3, half the peak (the step counter drives the schedule), not its
  value at step 1, zero (an optimizer count that stopped with the skipped steps); the log says
  what was applied."""
  trainer, step, good, bad = poisoned_step(monkeypatch, steps=8, warmup_steps=4, lr=1e-2)
  state = trainer.init_state(0)
  for _ in range(2):
    state, out = step(state, {"tokens": bad})
    assert int(out["skipped"]) == 1
  before = jax.tree.map(np.asarray, state["params"])
  state, out = step(state, {"tokens": good})
  assert int(out["skipped"]) == 0 and int(state["step"]) == 3
  assert float(out["lr"]) == pytest.approx(0.5e-2)
  # Adam's first applied update is lr * sign(gradient) wherever the gradient is not tiny: the
  # largest parameter change is the learning rate that was applied.
  change = max(float(np.abs(np.asarray(a) - b).max())
               for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(before)))
  assert change == pytest.approx(0.5e-2, rel=1e-3)


def test_a_resumed_run_cuts_back_its_tensorboard_curves(tmp_path):
  """Logged to step 5, resumed from the checkpoint of step 3 (step 5's was lost): steps 4 and 5
  are logged again, and each step is one point of each TensorBoard curve, as in metrics.jsonl."""
  from tensorboard.backend.event_processing import event_file_loader
  config = tiny_config(steps=6, warmup_steps=1)
  config.data.resolution, config.palette.k = 4, 16
  config.checkpoint.every = 3
  pretrain_stage.run(config, str(tmp_path), log=lambda *_: None, stop_after=5)
  shutil.rmtree(tmp_path / "checkpoints" / "pretrain" / "5")
  logs = []
  pretrain_stage.run(config, str(tmp_path), log=logs.append)
  assert any("Resumed from checkpoint step 3" in line for line in logs)
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
  steps = [e.step for path in sorted((tmp_path / "tensorboard").iterdir())
           for e in event_file_loader.EventFileLoader(str(path)).Load()
           if any(v.tag == "pretrain/loss" for v in e.summary.value)]
  assert sorted(steps) == [1, 2, 3, 4, 5, 6]


def test_a_transient_storage_error_reads_the_step_again_and_moves_nothing(tmp_path, monkeypatch):
  """A read of the newest step fails once with words that look like damage (an object store's
  flaky read): it is read again and restored, not set aside for an older step. A step that
  fails on every read is damaged for certain: set aside, and the older one restored."""
  import orbax.checkpoint as ocp
  config, trainer = one_device_trainer(steps=2)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path))
  ckpt.retry_wait_s = 0.01
  for step in (1, 2):
    ckpt.save(step, trainer.init_state(step), {"config": config.to_dict()})
  ckpt.wait()
  real, failures = ocp.CheckpointManager.restore, []

  def flaky(self, step, *args, **kwargs):
    items = kwargs.get("args") or (args[0] if args else None)
    if step == 2 and "params" in getattr(items, "keys", lambda: ())() and len(failures) < budget:
      failures.append(step)
      raise ValueError("DATA_LOSS: checksum mismatch reading params/d/0.0 (connection reset)")
    return real(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "restore", flaky)
  budget, logs = 1, []
  step, _, _ = ckpt.restore_latest(trainer.abstract_state, log=logs.append)
  assert step == 2 and failures == [2] and sorted(os.listdir(tmp_path)) == ["1", "2"]
  assert any("reading it again" in line for line in logs)
  budget = 99  # damaged for certain: every read fails on the contents
  step, _, _ = ckpt.restore_latest(trainer.abstract_state, log=logs.append)
  assert step == 1 and len(failures) == 1 + 3  # three reads of step 2, each one failing
  assert any("is unreadable" in line and "moved to" in line for line in logs)
  ckpt.close()


@needs_fmnist
def test_nonfinite_steps_stop_the_run_and_nothing_nonfinite_is_saved(tmp_path):
  # A NaN learning rate: gradients are finite, every update is not. No step is applied; the
  # third in a row stops the run.
  config = tiny_config(steps=10, lr=float("nan"), warmup_steps=1, max_nonfinite_steps=3)
  config.checkpoint.every = 1
  with pytest.raises(loop_duties.NonFiniteLoss, match=r"3 steps in a row by step 3 .* last good "
                                               r"checkpoint \(step 2\) is kept"):
    pretrain_stage.run(config, str(tmp_path), log=lambda *_: None)
  ckpt_dir = str(tmp_path / "checkpoints" / "pretrain")
  assert sorted(os.listdir(ckpt_dir)) == ["1", "2"]
  trainer = train_lib.Trainer(model_lib.ModelConfig.from_config(config), config,
                              sharding_lib.make_mesh(config.mesh), sharding_lib.DEFAULT_RULES)
  ckpt = checkpoint_lib.Checkpointer(ckpt_dir)
  step, state, _ = ckpt.restore_latest(trainer.abstract_state)
  ckpt.close()
  init = trainer.init_state(config.seed)
  assert step == 2
  for saved, fresh in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(init["params"]), strict=True):
    assert np.isfinite(np.asarray(saved)).all()
    np.testing.assert_array_equal(np.asarray(saved), np.asarray(fresh))


def test_plan_xl_on_simulated_devices():
  """The laptop path: XL on 128 simulated CPU devices (its v5p-256 slice's chip count), memory
  from XLA's CPU compiler against a v5p chip's 95 GiB. The CPU has no fused attention (`auto`
  is `blocked` there: 4096-token scores stay in memory), so this plans XL's XLA-attention
  setting, fsdp=32 x tensor=4 in 4 micro-batches; its shipped setting is the TPU compiler's
  to judge (tests/test_plan.py)."""
  start = time.time()
  proc = subprocess.run(
      [sys.executable, "-m", "igpt_jax.main", f"--config={REPO}/configs/igpt_xl.py",
       "--config.stage=plan", "--config.plan.num_devices=128", "--config.plan.device_memory_gb=95",
       "--config.mesh.tensor=4", "--config.train.accum_steps=4",
       "--workdir=/tmp/igpt_plan_test"], capture_output=True, text=True, cwd=REPO, timeout=300,
      env={**os.environ, "XLA_FLAGS": xla_flags()})
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  print(f"plan XL/128: {time.time() - start:.1f}s, {out['per_device_bytes'] / 2**30:.2f} GiB per device")
  assert out["mesh"] == {"data": 1, "fsdp": 32, "tensor": 4}
  assert out["attention"] == "blocked (auto on cpu)"
  assert out["per_device_bytes"] > 0 and out["params"] == 6_810_875_904
  # 6.8B params + Adam state is ~82 GB; sharded 128 ways it must fit a 95 GiB chip.
  assert out["fits"] is True


def test_a_search_that_finds_nothing_names_the_closest_setting_it_tried():
  """Nothing fits: the log says which of the settings tried came closest, and by how much."""
  from igpt_jax import plan_search
  config = tiny_config(steps=2)
  logs = []
  found = plan_search.search(config, jax.devices()[:1], hbm_bytes=1024, chips=1, slices=1,
                             platform="cpu", better_than=None, log=logs.append, max_compiles=2)
  assert found is None
  tried = [float(line.split(": ")[-1].split(" GiB")[0]) for line in logs
           if line.startswith("plan: tried")]
  assert len(tried) == 2 and logs[-1].startswith("plan: the closest of the 2 settings tried: ")
  assert f"{min(tried):.3g} GiB per device, 9.54e-07 available" in logs[-1], logs[-1]


def test_launch_scripts_are_valid(tmp_path):
  scripts = [f"{REPO}/launch/{s}" for s in ("tpu_pod.sh", "gpu_slurm.sh", "local.sh")]
  for script in scripts:
    subprocess.run(["bash", "-n", script], check=True)
  shellcheck = os.path.join(os.path.dirname(sys.executable), "shellcheck")
  subprocess.run([shellcheck, *scripts], check=True)
  bad = subprocess.run(["bash", f"{REPO}/launch/local.sh", "-n", "zero"], capture_output=True,
                       text=True)
  assert bad.returncode == 2 and bad.stderr.strip() == "error: -n and -d take positive integers"
  # A checkout without .venv: python3 is tried, and one line says it lacks igpt_jax.
  checkout = tmp_path / "checkout"
  (checkout / "launch").mkdir(parents=True)
  shutil.copy(f"{REPO}/launch/local.sh", checkout / "launch")
  (tmp_path / "bin").mkdir()
  bare = tmp_path / "bin" / "python3"  # a python without site-packages: no igpt_jax, no absl
  bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
  bare.chmod(0o755)
  env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
  bad = subprocess.run(["bash", str(checkout / "launch" / "local.sh"), "-n", "2", "--",
                        "--config=configs/demo.py"], capture_output=True, text=True,
                       env={**env, "PATH": f"{tmp_path / 'bin'}:{env['PATH']}"})
  assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
  assert bad.stderr.startswith("error: python3 cannot import igpt_jax (no ") and "make install" in bad.stderr
  # tpu_pod.sh's commands against a fake gcloud: tests/test_tpu_pod.py.


@jax.tree_util.register_pytree_node_class
class HostReads:
  """An array that counts the times the host reads it (float())."""
  count = 0

  def __init__(self, value):
    self.value = value

  def tree_flatten(self):
    return (self.value,), None

  @classmethod
  def tree_unflatten(cls, _, children):
    return cls(*children)

  def __float__(self):
    HostReads.count += 1
    return float(self.value)


@needs_fmnist
def test_an_evaluation_reads_its_sums_from_the_device_once(monkeypatch):
  """Batch sums accumulate on the device, and the host reads each once, at the end -- not once
  a batch, which makes the host wait for the device at every batch."""
  from igpt_jax.data import pipeline, transform
  config, trainer = one_device_trainer(batch_size=16)
  data = sources.load(config, "test")
  centers = np.linspace(-1, 1, 16, dtype=np.float32)[:, None]
  tokenizer = transform.Tokenizer(centers, 4, trainer.mesh, trainer.rules)
  params = trainer.init_state(0)["params"]
  nll = tokens = 0.0  # 20 batches, summed on the host
  for batch in list(pipeline.eval_batches(data, batch_size=16, augment=config.data.augment))[:20]:
    g = sharding_lib.global_batch(batch, trainer.mesh, trainer.rules, 16)
    sums = trainer.eval_fn(params, tokenizer(g["images"], g["boxes"]), g["labels"], g["mask"])
    nll, tokens = nll + float(sums["nll"]), tokens + float(sums["tokens"])
  eval_fn = trainer.eval_fn
  monkeypatch.setattr(trainer, "eval_fn", lambda *args: {
      k: HostReads(v) for k, v in eval_fn(*args).items()})
  out = evaluation.evaluate(trainer, params, data, tokenizer, config, max_batches=20)
  assert HostReads.count == len(sums)  # once per sum
  assert out["eval_loss"] == pytest.approx(nll / tokens, rel=1e-6)


@needs_fmnist
def test_evaluation_during_training_compiles_once(tmp_path, caplog):
  """...and runs every eval_every steps whatever log_every is (it ran only on logged steps)."""
  config = tiny_config(steps=6, warmup_steps=2, eval_every=2, eval_batches=2, log_every=5)
  jax.config.update("jax_log_compiles", True)
  try:
    with caplog.at_level(logging.WARNING):
      pretrain_stage.run(config, str(tmp_path), log=lambda *_: None)
  finally:
    jax.config.update("jax_log_compiles", False)
  evaluated = [r["step"] for r in read_metrics(tmp_path) if "eval_loss" in r]
  assert evaluated == [2, 4, 6]
  compiles = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith("Compiling jit(eval_batch)")]
  assert len(compiles) == 1, compiles


def test_watchdog_dumps_every_thread_when_a_step_stalls(tmp_path):
  from igpt_jax.watchdog import Watchdog
  logs = []
  with open(tmp_path / "stderr", "w+") as stream:
    with Watchdog(5.0, log=logs.append, min_seconds=0.3, poll=0.05, stream=stream) as dog:
      for step in range(6):
        time.sleep(0.01)
        dog.beat(step)
      with dog.paused():  # evaluation: slow by design, never reported
        time.sleep(0.6)
      assert not logs
      time.sleep(0.8)  # a stalled step
    stream.seek(0)
    dump = stream.read()
  assert len(logs) == 1 and "no step finished" in logs[0] and "after step 5" in logs[0]
  assert "Thread" in dump and "test_watchdog_dumps_every_thread" in dump  # where it hangs


@needs_fmnist
def test_the_watchdog_times_steps_on_the_device_not_their_dispatch(tmp_path):
  """One CPU device dispatches asynchronously, so the host runs ahead of the device between log
  steps: a watchdog fed at dispatch measures ~0 s steps. Fed when a step's result is ready, its
  median (`step_s` in metrics.jsonl) is the step time measured over each log interval."""
  proc = start_training(str(tmp_path), steps=60, every=1000, extra=[
      "--config.data.resolution=16", "--config.train.batch_size=8", "--config.train.log_every=20"])
  out, _ = proc.communicate(timeout=240)
  assert proc.returncode == 0, out[-3000:]
  rows = read_metrics(tmp_path)
  assert [r["step"] for r in rows] == [20, 40, 60]
  for row in rows[1:]:  # the first interval holds the first steps' warm-up
    measured = 8 * 16 * 16 / row["tokens_per_s"]  # seconds per step over the interval
    assert measured >= 0.03, measured  # steps long enough to tell dispatch from completion
    assert 0.5 < row["step_s"] / measured < 2, (row["step_s"], measured)


@needs_fmnist
def test_profile_steps_write_a_trace_tensorboard_reads(tmp_path):
  config = tiny_config(steps=4, warmup_steps=1)
  config.train.profile_steps = "2,3"
  logs = []
  pretrain_stage.run(config, str(tmp_path), log=logs.append)
  traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0, list((tmp_path / "profile").rglob("*"))
  assert any("Profile of steps 2-3" in line for line in logs)


@needs_fmnist
def test_bert_pretraining_resumes_bit_exactly(tmp_path):
  """L_BERT through the loop: the masks of a resumed run are those of an uninterrupted one."""
  config = tiny_config(steps=8, warmup_steps=2)
  config.model.objective = "bert"
  config.checkpoint.every = 3
  pretrain_stage.run(config, str(tmp_path / "straight"), log=lambda *_: None)
  pretrain_stage.run(config, str(tmp_path / "resumed"), log=lambda *_: None, stop_after=4)
  pretrain_stage.run(config, str(tmp_path / "resumed"), log=lambda *_: None)
  a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
  assert [r["step"] for r in b] == list(range(1, 9))
  assert [r["loss"] for r in a] == [r["loss"] for r in b]
  assert a[-1]["loss"] < a[0]["loss"]  # it learns: masked tokens predicted better than at start


def test_bert_finetune_evaluation_ensembles_its_masks():
  import dataclasses

  from flax import nnx
  config = tiny_config(steps=2)
  config.model.objective, config.data.resolution, config.palette.k = "bert", 4, 16
  cfg = dataclasses.replace(model_lib.ModelConfig.from_config(config), num_classes=3)
  mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:1])
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 16, (16, cfg.seq_len)), jnp.int32)
  labels, weights = jnp.asarray(rng.integers(0, 3, 16)), jnp.ones((16,))
  correct = {}
  for masks in (0, 4):
    config.finetune.bert_masks = masks
    trainer = train_lib.Trainer(cfg, config, mesh, sharding_lib.DEFAULT_RULES, stage="finetune")
    params = trainer.init_state(0)["params"]
    params["class_head"] = jax.random.normal(jax.random.key(1), params["class_head"].shape)
    correct[masks] = int(trainer.eval_fn(params, tokens, labels, weights)["correct"])
    model = nnx.merge(trainer.graphdef, params)
    want = (train_lib.ensembled_class_logits(model, tokens, config.seed + 1, masks) if masks
            else model.logits_and_class_logits(tokens, objectives_mask(config, tokens))[1])
    assert correct[masks] == int(jnp.sum(jnp.argmax(want, -1) == labels))


def objectives_mask(config, tokens):
  from igpt_jax import objectives
  return objectives.bert_mask(jax.random.key(config.seed + 1), tokens.shape)


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_a_batch_the_mesh_cannot_split_names_the_field_to_change(stage):
  """Both stages take their batch from config.train (finetune has no batch_size of its own)."""
  config = tiny_config(batch_size=12)
  with pytest.raises(UserError, match=r"micro-batch has 12 rows "
                     r"\(--config\.train\.batch_size=12 / accum_steps=1\): make it a multiple of 8"):
    train_lib.check_fits_devices(config, stage)
