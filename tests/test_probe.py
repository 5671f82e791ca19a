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

  in_memory = logreg.fit_in_memory(train.load(), val.load(), test.load(), 10, L2)

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
