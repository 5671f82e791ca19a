"""Probes at scale: features streamed to disk in bounded chunks, the streamed solver matching the
in-memory one on real features, the choice of probed layers, and a store that is never read
back half-written."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx

from igpt_jax import features, logreg, probe, probe_report
from igpt_jax.stages import pretrain as pretrain_stage
from igpt_jax import model as model_lib
from igpt_jax import sharding as sharding_lib
from igpt_jax import workdir as workdir_lib
from igpt_jax.config import UserError
from igpt_jax.data import sources, transform
from conftest import REPO, xla_flags
from test_train import TINY_OVERRIDES, needs_fmnist, tiny_config

L2 = (1e-4, 1e-3, 1e-2, 1e-1)
CHUNK_BYTES = 64 * 1024  # the cap on what the streamed path holds of a split at a time


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
  """Layer features of a briefly pretrained model: 20k train, 2k validation, 5k test images of
  Fashion-MNIST, written in chunks of at most CHUNK_BYTES."""
  import jax
  workdir = str(tmp_path_factory.mktemp("probe"))
  config = tiny_config(steps=30, warmup_steps=5)
  pretrain_stage.run(config, workdir, log=lambda *_: None)
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.DEFAULT_RULES
  cfg, params, centers, _ = workdir_lib.load_pretrained(config, workdir, mesh, rules)
  graphdef = nnx.graphdef(model_lib.abstract_model(cfg))
  feats = jax.jit(lambda t: nnx.merge(graphdef, params).features(t).transpose(1, 0, 2))
  tokenizer = transform.Tokenizer(centers, config.data.resolution, mesh, rules)
  out = []
  for role, n in (("train", 20_000), ("validation", 2_000), ("test", 5_000)):
    data = sources.load(config, role)
    data = data.subset(np.arange(n), f"{data.name}[:{n}]")
    path = os.path.join(workdir, role)
    out.append(features.extract({"f": path}, data, lambda t, _: {"f": feats(t)}, tokenizer, mesh,
                                rules, 256, {"split": role}, CHUNK_BYTES, "none")["f"])
  return mesh, rules, out


@needs_fmnist
def test_streamed_probe_holds_one_chunk_at_a_time_and_matches_the_in_memory_solver(
    stores, monkeypatch):
  mesh, rules, (train, val, test) = stores
  assert train.num_examples == 20_000 and (train.groups, train.dim) == (2, 32)
  float32_bytes = train.num_examples * train.groups * train.dim * 4
  assert float32_bytes > 40 * CHUNK_BYTES  # the split would not fit under the cap in one array
  chunk_bytes = [sum(os.path.getsize(f) for f in train.path.glob(f"{name}.*"))
                 for name in train.chunk_names()]  # a file per layer and the labels
  assert len(chunk_bytes) > 20 and max(chunk_bytes) <= CHUNK_BYTES

  # The same L2 values for both (the in-memory solver would otherwise widen its grid).
  in_memory = logreg.fit_in_memory(train.load(), val.load(), test.load(), 10, L2, widen=0)

  def refuse(*_, **__):
    raise AssertionError("the streamed solver loaded a whole split")
  monkeypatch.setattr(features.Store, "load", refuse)
  streamed = logreg.fit_streamed(train, val, test, 10, L2, mesh=mesh, rules=rules,
                                 batch_size=1024, epochs=50, lr=0.3, seed=0, widen=0)
  for a, b in zip(in_memory, streamed, strict=True):
    assert a["accuracy"] > 0.3  # far above chance (10 classes): a real fit, on real features
    # within 25 of the 5,000 test images (counted, not compared as rounded floats)
    assert round(abs(a["accuracy"] - b["accuracy"]) * test.num_examples) <= 25, (
        in_memory, streamed)


@needs_fmnist
def test_concatenated_layers_are_one_wider_group(stores):
  _, _, (train, _, _) = stores
  x, y = train.read(train.chunk_names()[0])
  joined, _ = train.read(train.chunk_names()[0], view=[[0, 1]])
  assert joined.shape == (len(y), 1, 64)
  np.testing.assert_array_equal(joined[:, 0, 32:], x[:, 1])


def test_probed_layers():
  assert probe.choose_layers("auto", 4) == [1, 2, 3, 4]
  auto = probe.choose_layers("auto", 48)
  assert set(range(16, 33)) <= set(auto) and {1, 48} <= set(auto) and len(auto) < 30
  assert probe.choose_layers("all", 24) == list(range(1, 25))
  assert probe.choose_layers("12, 4,8", 24) == [4, 8, 12]
  for typo in ("4,99", "middle", "0"):
    with pytest.raises(UserError, match="probe.layers"):
      probe.choose_layers(typo, 24)
  # The paper's multi-layer features: the best layer and its nearest probed neighbours.
  assert probe.concat_groups(10, [4, 8, 10, 11, 12, 16], 3) == [1, 2, 3]
  assert probe.concat_groups(4, [4, 8, 12], 5) == [0, 1, 2]


def synthetic_store(path, x, y, chunk_rows=256):
  """x [N, G, D] float32 written through the store's own Writer (float16 chunks) and meta."""
  writer = features.Writer(path, 0, chunk_rows, np.float16)
  for lo in range(0, len(y), chunk_rows):
    writer.add(x[lo:lo + chunk_rows], y[lo:lo + chunk_rows])
  writer.flush()
  writer.close()
  meta = {"format": features.FORMAT, "key": {}, "num_examples": len(y), "groups": x.shape[1],
          "dim": x.shape[2], "dtype": "float16",
          "ranges": {"0": {"chunks": writer.names, "rows": writer.total_rows}}}
  (writer.path / "meta.json").write_text(json.dumps(meta))
  return features.Store(path)


def class_clusters(n, groups, dim, classes, seed, spread=1.0):
  """[n, groups, dim] float32 features of `classes` Gaussian clusters, and the labels."""
  rng = np.random.default_rng(seed)
  centres = np.random.default_rng(99).standard_normal((classes, groups, dim)) * spread / dim**0.5
  y = rng.integers(0, classes, n)
  return (centres[y] + rng.standard_normal((n, groups, dim)) / dim**0.5).astype(np.float32), y


def test_the_paper_solver_runs_one_layer_at_a_time_at_igpt_l_width(tmp_path):
  """At iGPT-L's width (1536) with a budget that holds one layer's three splits but not all
  three layers', probe.solver=auto still fits L-BFGS, layer by layer, and each layer's result
  equals the fit of all layers in memory at once; results name the solver and why. A budget
  below one layer streams (Adam)."""
  import ml_collections
  splits = [class_clusters(n, 3, 1536, 5, seed) for n, seed in ((400, 0), (150, 1), (150, 2))]
  stores = tuple(synthetic_store(tmp_path / str(i), x, y) for i, (x, y) in enumerate(splits))
  one = probe.in_memory_peak_bytes(stores, 1, 1536)
  every = probe.in_memory_peak_bytes(stores, 3, 1536)
  config = ml_collections.ConfigDict({"seed": 0, "probe": {
      "solver": "auto", "max_memory_mb": (one + every) / 2 / 2**20, "l2": (1e-2, 1e-1),
      "steps": 30, "fit_batch_size": 64, "epochs": 2, "lr": 0.1}})
  assert probe.choose_solver(stores, 3, 1536, config)[0] == "lbfgs_per_layer"
  loads, groups_read = [], []
  real_load, real_group = features.Store.load, features.Store._group
  def counting_load(self, view=None, rows=None):
    x, y = real_load(self, view, rows)
    loads.append(x.shape[1:])
    return x, y
  def counting_group(self, name, group):
    groups_read.append(group)
    return real_group(self, name, group)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(features.Store, "load", counting_load)
    patch.setattr(features.Store, "_group", counting_group)
    per_layer = probe._fit(stores, 5, config, None, None)
  assert set(loads) == {(1, 1536)}  # never more than one layer of a split in memory
  chunks = sum(len(s.chunk_names()) for s in stores)  # each layer's file read once per chunk:
  assert sorted(groups_read) == sorted(list(range(3)) * chunks)  # not every layer's each time
  whole = logreg.fit_in_memory(*(s.load() for s in stores), 5, (1e-2, 1e-1), steps=30)
  for got, want in zip(per_layer, whole, strict=True):
    assert got["solver"] == "lbfgs_per_layer" and "do not" in got["solver_reason"]
    assert got["accuracy"] == want["accuracy"] and got["l2"] == want["l2"]
    assert got["accuracy"] > 0.5  # 5 classes: a real fit
  config.probe.max_memory_mb = one / 2 / 2**20
  assert probe.choose_solver(stores, 3, 1536, config) == (
      "adam", f"one group's features alone ({one / 2**30:.2f} GiB) exceed "
      f"probe.max_memory_mb={config.probe.max_memory_mb}")
  config.probe.max_memory_mb = 2 * every / 2**20
  assert probe.choose_solver(stores, 3, 1536, config)[0] == "lbfgs"


def test_streamed_batches_mix_the_chunks_of_a_store_written_in_class_order(tmp_path):
  """A folder's store is in class order, a chunk ~ one class: shuffling within a chunk would
  give batches of one class. The shuffle buffer pools several chunks: batches of many
  classes, every row once an epoch."""
  y = np.repeat(np.arange(8), 64)  # 8 classes in order, 64 rows each = one chunk each
  x = np.arange(len(y), dtype=np.float32)[:, None, None] * np.ones((1, 1, 2), np.float32)
  store = synthetic_store(tmp_path / "s", x, y, chunk_rows=64)
  rng = np.random.default_rng(0)
  alone = list(logreg._batches(store, 32, 0, None, rng, shuffle=True, mix=1))
  pooled = list(logreg._batches(store, 32, 0, None, rng, shuffle=True, mix=4))
  assert max(len(set(b[1].tolist())) for b in alone) == 1
  assert min(len(set(b[1].tolist())) for b in pooled) >= 3
  rows = np.concatenate([b[0][:, 0, 0] for b in pooled])
  np.testing.assert_array_equal(np.sort(rows), np.arange(len(y)))


def test_the_streamed_fit_widens_l2_past_an_edge(tmp_path):
  """Like the in-memory solver, the streamed one does not stop at an edge of probe.l2: with a
  grid that only over-penalises, it fits 10x, 100x, 1000x weaker values too and chooses among
  them. (The classes are readable only by cancelling a noise two features share, which a
  strongly penalised fit cannot do.)"""
  mesh = sharding_lib.make_mesh(tiny_config().mesh)

  def split(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    noise = 3 * rng.standard_normal(n)
    x = np.stack([y + noise, noise, *rng.standard_normal((6, n))], -1)
    return x[:, None, :].astype(np.float32), y

  splits = [split(n, seed) for n, seed in ((512, 0), (256, 1), (256, 2))]
  stores = [synthetic_store(tmp_path / str(i), x, y, 128) for i, (x, y) in enumerate(splits)]
  logged = []
  result = logreg.fit_streamed(*stores, 4, (1.0, 10.0), mesh=mesh,
                               rules=sharding_lib.DEFAULT_RULES, batch_size=128, epochs=20,
                               lr=0.1, seed=0, log=logged.append)[0]
  assert result["l2_tried"] == [0.001, 0.01, 0.1, 1.0, 10.0]
  assert result["l2"] < 1.0 and result["val_accuracy"] > 0.6  # 1.0 alone: ~1/3
  assert any("at an edge" in line for line in logged)


def test_float16_store_keeps_features_with_a_large_common_offset(tmp_path):
  """Pooled features can sit far from zero with a small spread (a norm's output averaged over
  positions): stored naively as float16 (11-bit mantissa: steps of 1/32 at 50), the spread that
  carries the classes would round away. The store keeps them: the probe on stored features
  equals the probe on the float32 originals."""
  rng = np.random.default_rng(0)
  classes, d = 4, 16
  centres = rng.standard_normal((classes, d))
  def split(n):
    y = rng.integers(0, classes, n)
    x = 50.0 + 0.01 * (centres[y] + 0.7 * rng.standard_normal((n, d)))
    return x[:, None, :].astype(np.float32), y
  original = [split(n) for n in (3000, 1000, 1000)]
  stored = [synthetic_store(tmp_path / str(i), x, y) for i, (x, y) in enumerate(original)]
  x0, _ = stored[0].load()
  assert np.abs(x0 - original[0][0]).max() < 5e-5  # float16 of the spread, not of the offset
  want = logreg.fit_in_memory(*original, classes, L2)[0]["accuracy"]
  got = logreg.fit_in_memory(*(s.load() for s in stored), classes, L2)[0]["accuracy"]
  assert want > 0.8 and got == pytest.approx(want, abs=0.003)
  mean, std = stored[0].moments()
  exact = original[0][0].astype(np.float64)
  np.testing.assert_allclose(mean, exact.mean(0), rtol=1e-6)
  np.testing.assert_allclose(std, exact.std(0), rtol=1e-3)


def probe_command(workdir, load_step: int) -> list[str]:
  """The probe stage at `load_step` of a tiny run, on 20k train images in chunks of ~2k rows
  (probe.max_memory_mb=1): long enough (300+ batches) to be stopped midway."""
  return [sys.executable, "-m", "igpt_jax.main", f"--config={REPO}/configs/demo.py",
          *TINY_OVERRIDES, "--config.stage=probe", f"--workdir={workdir}",
          f"--config.checkpoint.load_step={load_step}", "--config.probe.train_examples=20000",
          "--config.probe.validation_examples=500", "--config.probe.test_examples=500",
          "--config.probe.batch_size=64", "--config.probe.max_memory_mb=1",
          "--config.probe.solver=lbfgs", "--config.probe.steps=20"]


@needs_fmnist
def test_a_store_stopped_midway_is_never_read_back_as_complete(tmp_path):
  """Probe at step 4; a probe at step 8 stopped (SIGTERM) after it has rewritten a chunk; the
  probe at step 4 again must read step 4's features, not a mix: the stopped extraction left no
  meta.json to be taken for complete, and its chunks belong to another key."""
  config = tiny_config(steps=8, warmup_steps=2)
  config.checkpoint.every = 4
  pretrain_stage.run(config, str(tmp_path), log=lambda *_: None)
  env = {**os.environ, "XLA_FLAGS": xla_flags()}
  train_store = tmp_path / "probe" / "features" / "pretrained-train"

  def probe_at(step):
    out = subprocess.run(probe_command(tmp_path, step), cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return (features.Store(train_store).load(),
            json.load(open(tmp_path / "probe" / "results.json")))

  (xa, ya), results_a = probe_at(4)
  began = time.time()
  proc = subprocess.Popen(probe_command(tmp_path, 8), cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:  # until step 8 rewrote a chunk
    if any(p.stat().st_mtime > began for p in train_store.glob("r*.npz")):
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  stopped_meta = (train_store / "meta.json").exists()
  (xa2, ya2), results_a2 = probe_at(4)
  np.testing.assert_array_equal(ya2, ya)
  np.testing.assert_array_equal(xa2, xa)  # step 4's features, not half step 8's
  assert results_a2["by_layer"] == results_a["by_layer"]
  assert proc.returncode == 75, out[-3000:]  # stopped, keeping its whole chunks
  assert not stopped_meta


def test_a_stopped_extraction_resumes_after_its_last_whole_chunk(tmp_path, monkeypatch):
  """Stopped before its 7th batch (every process at the same batch), an extraction keeps its
  whole chunks; the same extraction again reads only the rest, and the store equals one written
  without a stop."""
  import jax
  import jax.numpy as jnp
  from igpt_jax import distributed
  rng = np.random.default_rng(0)
  data = sources.from_arrays(rng.integers(0, 256, (300, 4, 4, 1), dtype=np.uint8),
                             rng.integers(0, 3, 300))
  mesh = sharding_lib.make_mesh(tiny_config().mesh)
  rules = sharding_lib.DEFAULT_RULES
  tokenizer = transform.Tokenizer(np.linspace(-1, 1, 16, dtype=np.float32)[:, None], 4, mesh,
                                  rules)
  project = jax.jit(lambda t: jnp.stack([jnp.sin(t * 0.1), jnp.cos(t * 0.3)], 1))
  forward = lambda tokens, _: {"f": project(tokens)}  # noqa: E731 - [B, 2 groups, 16]
  key = {"model": "test"}
  chunk_bytes = 4096 + 3 * 16 * (2 * 16 * 2 + 4)  # 3 batches of 16 float16 [2, 16] rows
  extract = lambda path, log=None: features.extract(  # noqa: E731 - 19 batches of 16
      {"f": path}, data, forward, tokenizer, mesh, rules, 16, key, chunk_bytes, "none", log)
  whole = extract(tmp_path / "whole")["f"]
  calls = []

  def stop_at_seventh():
    calls.append(1)
    return len(calls) >= 7
  monkeypatch.setattr(distributed.PREEMPTION, "should_stop", stop_at_seventh)
  with pytest.raises(distributed.Preempted):
    extract(tmp_path / "stopped")
  monkeypatch.undo()
  done = features.progress(tmp_path / "stopped", 0, key)
  assert done["batches"] == 6 and len(done["chunks"]) == 2
  assert not (tmp_path / "stopped" / "meta.json").exists()
  logs = []
  resumed = extract(tmp_path / "stopped", log=logs.append)["f"]
  assert any("resuming after 96/300 examples" in line for line in logs)
  for a, b in zip(whole.load(), resumed.load(), strict=True):
    np.testing.assert_array_equal(a, b)
  # Another key never resumes (or reuses) these chunks: the store starts over.
  other = features.extract({"f": tmp_path / "stopped"}, data, forward, tokenizer, mesh, rules,
                           16, {"model": "other"}, chunk_bytes, "none")["f"]
  assert other.meta["key"] == {"model": "other"} and other.num_examples == 300


def test_the_accuracy_plot_ticks_whole_layers():
  """Two probed layers: matplotlib's default ticks were 1.0, 1.2, 1.4, ... -- layers 1.2 do not
  exist."""
  results = {"by_layer": [{"layer": 1, "accuracy": 0.5}, {"layer": 2, "accuracy": 0.6}],
             "raw_pixel_accuracy": 0.4}
  fig = probe_report.accuracy_plot(results, {1: 0.3, 2: 0.35})
  ticks = fig.axes[0].get_xticks()
  assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks


def test_features_that_do_not_fit_the_disk_are_refused_in_one_line(tmp_path, monkeypatch):
  import collections
  import shutil
  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, 3 * 10**9))
  features.check_room(tmp_path / "not" / "yet", 2 * 10**9)  # the nearest existing folder's disk
  with pytest.raises(UserError, match=r"^The probe's features need 94 GB in .*yet, whose disk "
                     r"has 3 GB free: free space"):
    features.check_room(tmp_path / "not" / "yet", 94 * 10**9)
  features.check_room("gs://bucket/run/probe/features", 10**15)  # object stores: not checked
