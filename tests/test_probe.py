"""Probes at scale: features streamed to disk in bounded chunks, the streamed solver matching the
in-memory one on real features, and the choice of probed layers."""
import os

import numpy as np
import pytest
from flax import nnx

from igpt_jax import features, logreg, probe
from igpt_jax.stages import pretrain as pretrain_stage
from igpt_jax import model as model_lib
from igpt_jax import sharding as sharding_lib
from igpt_jax import workdir as workdir_lib
from igpt_jax.config import UserError
from igpt_jax.data import sources, transform
from test_train import needs_fmnist, tiny_config

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
  chunk_files = [train.path / name for name in train.chunk_names()]
  assert len(chunk_files) > 20 and max(os.path.getsize(f) for f in chunk_files) <= CHUNK_BYTES

  # The same L2 values for both (the in-memory solver would otherwise widen its grid).
  in_memory = logreg.fit_in_memory(train.load(), val.load(), test.load(), 10, L2, widen=0)

  def refuse(*_, **__):
    raise AssertionError("the streamed solver loaded a whole split")
  monkeypatch.setattr(features.Store, "load", refuse)
  streamed = logreg.fit_streamed(train, val, test, 10, L2, mesh=mesh, rules=rules,
                                 batch_size=1024, epochs=50, lr=0.3, seed=0)
  for a, b in zip(in_memory, streamed, strict=True):
    assert a["accuracy"] > 0.3  # far above chance (10 classes): a real fit, on real features
    assert abs(a["accuracy"] - b["accuracy"]) <= 0.005, (in_memory, streamed)


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
  import json
  writer = features.Writer(path, 0, chunk_rows, np.float16)
  for lo in range(0, len(y), chunk_rows):
    writer.add(x[lo:lo + chunk_rows], y[lo:lo + chunk_rows])
  writer.flush()
  meta = {"format": features.FORMAT, "key": {}, "num_examples": len(y), "groups": x.shape[1],
          "dim": x.shape[2], "dtype": "float16",
          "ranges": {"0": {"chunks": writer.names, "rows": writer.total_rows}}}
  (writer.path / "meta.json").write_text(json.dumps(meta))
  return features.Store(path)


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
