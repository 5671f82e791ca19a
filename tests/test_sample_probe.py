"""Sampling with the KV cache, and the linear probe's solver."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from igpt_jax import logreg, sample
from igpt_jax.model import ImageGPT, ModelConfig
from test_model import randomise

CFG = ModelConfig(num_layers=2, d_model=32, num_heads=4, vocab_size=16, seq_len=36)


@pytest.mark.parametrize("chunks", [1, 4])  # a 10-token prefix ends inside chunk 2 of 4 (9 each)
def test_greedy_cached_sampling_equals_uncached_greedy_decoding(chunks):
  model = randomise(ImageGPT(CFG, rngs=nnx.Rngs(0)), scale=0.5)
  prefix = np.random.default_rng(0).integers(0, 16, (3, 10)).astype(np.int32)
  cached = sample.generate(model, 3, jax.random.key(0), prefix=prefix, temperature=0.0,
                           cache_chunks=chunks)
  np.testing.assert_array_equal(np.asarray(cached), sample.greedy_uncached(model, prefix, CFG.seq_len))
  # Unconditional greedy too (the start token alone as context).
  uncond = sample.generate(model, 2, jax.random.key(0), temperature=0.0, cache_chunks=chunks)
  np.testing.assert_array_equal(np.asarray(uncond),
                                sample.greedy_uncached(model, np.zeros((2, 0), np.int32), CFG.seq_len))


def test_completions_keep_the_given_half_and_sampling_varies():
  model = randomise(ImageGPT(CFG, rngs=nnx.Rngs(1)), scale=0.5)
  prefix = np.random.default_rng(1).integers(0, 16, (4, 18)).astype(np.int32)
  a = np.asarray(sample.generate(model, 4, jax.random.key(1), prefix=prefix))
  b = np.asarray(sample.generate(model, 4, jax.random.key(2), prefix=prefix))
  np.testing.assert_array_equal(a[:, :18], prefix)
  np.testing.assert_array_equal(b[:, :18], prefix)
  assert not np.array_equal(a[:, 18:], b[:, 18:])  # temperature 1: different keys, different images
  assert a.min() >= 0 and a.max() < CFG.vocab_size


def test_top_k_restricts_choices():
  model = randomise(ImageGPT(CFG, rngs=nnx.Rngs(2)), scale=0.5)
  out = np.asarray(sample.generate(model, 8, jax.random.key(3), top_k=1))
  np.testing.assert_array_equal(out, np.asarray(sample.generate(model, 8, jax.random.key(3), temperature=0.0)))


def test_probe_separates_linearly_separable_features():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(5, 20)) * 3
  y = rng.integers(0, 5, 3000)
  x = (centers[y] + rng.normal(size=(3000, 20)))[:, None].astype(np.float32)  # one group
  split = lambda labels: ((x[:1500], labels[:1500]), (x[1500:2000], labels[1500:2000]),
                          (x[2000:], labels[2000:]))
  out = logreg.fit_in_memory(*split(y), num_classes=5, l2_grid=(1e-4, 1e-2))
  assert out[0]["accuracy"] > 0.99
  # And it is not trivially high: shuffled labels give chance.
  shuffled = logreg.fit_in_memory(*split(rng.permutation(y)), num_classes=5, l2_grid=(1e-4, 1e-2))
  assert shuffled[0]["accuracy"] < 0.4


def test_image_grid_layout():
  rows = [np.zeros((3, 4, 4, 1), np.uint8), np.full((3, 4, 4, 1), 9, np.uint8)]
  grid = sample.image_grid(rows, pad=2)
  assert grid.shape == (2 * 6 + 2, 3 * 6 + 2, 1)
  assert grid[2, 2, 0] == 0 and grid[8, 2, 0] == 9 and grid[0, 0, 0] == 255
