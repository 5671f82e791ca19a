"""The training loop's duties, each alone: when it acts, and what it does, with stand-ins for
the run around it (the loop tests in test_train.py run them together)."""
import contextlib
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from igpt_jax import loop_duties


class Recorder:
  """A stand-in for whatever a duty calls: records calls by name."""

  def __init__(self, **returns):
    self.calls, self.returns = [], returns

  def __getattr__(self, name):
    def call(*args, **kwargs):
      self.calls.append((name, *args))
      return self.returns.get(name)
    return call

  def named(self, name):
    return [call[1:] for call in self.calls if call[0] == name]


class Watchdog(Recorder):
  @contextlib.contextmanager
  def paused(self):
    self.calls.append(("paused",))
    yield


def one_device_mesh():
  return jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))


def run_of(stage="pretrain", causal=True, **train):
  tcfg = ml_collections.ConfigDict({"steps": 12, "log_every": 5, "eval_every": 4,
                                    "batch_size": 2, "sample_every": 4,
                                    "max_nonfinite_steps": 3, **train})
  config = ml_collections.ConfigDict({"checkpoint": {"every": 6}, "seed": 0})
  return types.SimpleNamespace(stage=stage, tcfg=tcfg, config=config,
                               cfg=types.SimpleNamespace(causal=causal), ckpt=Recorder(),
                               data=types.SimpleNamespace(class_names=["a", "b"]),
                               input_view={"resolution": 8}, split_rule="permutation",
                               trainer=types.SimpleNamespace(train_cfg=tcfg, stage=stage),
                               centers=np.zeros((4, 3), np.float32), log=lambda *_: None)


def test_pace_tells_the_watchdog_of_a_step_once_the_next_is_queued():
  watchdog = Watchdog()
  pace = loop_duties.Pace(watchdog, one_device_mesh())
  assert not pace.wait_each_step  # one device: steps stay queued
  for step in (1, 2, 3):
    pace.dispatched(step, jnp.float32(step))
  assert watchdog.named("beat") == [(1,), (2,)]  # step 3 is still in flight
  pace.caught_up(3)  # a logged step: the host waited for it
  assert watchdog.named("beat") == [(1,), (2,), (3,)]
  pace.caught_up(3)
  assert len(watchdog.named("beat")) == 3  # not twice


def test_steps_are_logged_on_their_interval_and_at_evaluations_and_the_end(monkeypatch):
  monkeypatch.setattr(loop_duties.metrics_lib, "Progress", lambda *a, **k: Recorder())
  monkeypatch.setattr(loop_duties.model_lib, "flops_per_token", lambda cfg: 1)
  run = run_of()
  run.cfg.seq_len = 4
  logger = loop_duties.LogSteps(run, Recorder(), 0, pace=None, watchdog=Watchdog())
  # log_every=5 and eval_every=4 are independent: evaluations never wait for a log step.
  assert [s for s in range(1, 13) if logger.due(s, s == 12)] == [4, 5, 8, 10, 12]


def test_saves_every_interval_at_the_end_and_at_a_stop(monkeypatch):
  monkeypatch.setattr(loop_duties, "checkpoint_meta", lambda *a: {"meta": True})
  run, writer = run_of(stage="finetune"), Recorder()
  saves = loop_duties.Saves(run, writer)
  out = {"nonfinite_longest": jnp.int32(0)}
  for step in range(1, 13):
    saves(step, {"state": step}, out, step == 12, preempted=step == 7)
  assert [args[0] for args in run.ckpt.named("save")] == [6, 7, 12]
  assert len(writer.named("flush")) == 3  # the metrics up to each checkpoint go with it


def test_a_diverged_run_stops_before_it_saves():
  run = run_of()
  run.ckpt = Recorder(all_steps=[6])
  saves = loop_duties.Saves(run, Recorder())
  with pytest.raises(loop_duties.NonFiniteLoss,
                     match=r"3 steps in a row by step 12 .* \(step 6\) is kept"):
    saves(12, {}, {"nonfinite_longest": jnp.int32(3)}, True, False)
  assert run.ckpt.named("save") == []


@pytest.mark.parametrize("stage,causal,expected", [("pretrain", True, [4, 8, 10]),
                                                   ("pretrain", False, []),
                                                   ("finetune", True, [])])
def test_sample_grids_only_for_ar_pretraining_never_at_a_stop(monkeypatch, stage, causal,
                                                              expected):
  monkeypatch.setattr(loop_duties, "sample_grid", lambda *a: np.zeros((2, 2, 3), np.uint8))
  run, writer = run_of(stage=stage, causal=causal, steps=10), Recorder()
  grids = loop_duties.SampleGrids(run, writer, Watchdog())
  for step in range(1, 11):
    grids(step, None, step == 10, preempted=False)
  grids(12, None, False, preempted=True)  # a stop: the save comes first, no grid
  assert [args[0] for args in writer.named("write_image")] == expected
