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


def test_l2_grid_widens_until_the_choice_is_bracketed():
  peak = lambda at: (lambda l2: (1.0 - abs(np.log10(l2) - np.log10(at)) / 10, None))  # noqa: E731
  best, _, _, tried, at_edge = logreg._grid_search(peak(1e-6), (1e-4, 1e-3, 1e-2))
  assert best == pytest.approx(1e-6) and not at_edge
  assert [round(np.log10(v)) for v in tried] == [-7, -6, -5, -4, -3, -2]  # one past the peak
  # Inside the grid: nothing added. Past the widening limit: reported as at the edge.
  assert logreg._grid_search(peak(1e-3), (1e-4, 1e-3, 1e-2))[3] == [1e-4, 1e-3, 1e-2]
  best, _, _, tried, at_edge = logreg._grid_search(peak(1e3), (1e-4, 1e-3, 1e-2))
  assert at_edge and best == pytest.approx(10.0) and len(tried) == 3 + logreg.WIDEN
  # A single value is an L2 fixed by hand.
  assert logreg._grid_search(peak(1e3), (0.5,))[3] == [0.5]


def test_probe_returns_test_predictions_that_give_its_accuracy():
  rng = np.random.default_rng(1)
  centers = rng.normal(size=(4, 8))
  y = rng.integers(0, 4, 2000)
  x = (centers[y] + rng.normal(size=(2000, 8)) * 1.5)[:, None].astype(np.float32)
  parts = ((x[:1000], y[:1000]), (x[1000:1400], y[1000:1400]), (x[1400:], y[1400:]))
  out = logreg.fit_in_memory(*parts, num_classes=4, l2_grid=(1e-3, 1e-1), predictions=True)[0]
  assert out["predictions"].shape == (600,)
  assert np.mean(out["predictions"] == y[1400:]) == out["accuracy"]
  assert 0.5 < out["accuracy"] < 0.99  # overlapping classes: a real fit, not a trivial one
  assert out["l2"] in out["l2_tried"] and not out["l2_at_edge"]


def test_bert_mask_ensemble_is_the_mean_of_single_mask_passes():
  from igpt_jax import objectives, probe
  cfg = ModelConfig(num_layers=2, d_model=32, num_heads=4, vocab_size=16, seq_len=36,
                    objective="bert")
  model = randomise(ImageGPT(cfg, rngs=nnx.Rngs(3)), scale=0.5)
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 16, (4, 36)), jnp.int32)
  singles = [model.features(tokens, objectives.bert_mask(
      jax.random.fold_in(jax.random.key(7), i), tokens.shape)) for i in range(3)]
  ensembled = jax.jit(lambda t: probe.masked_features(model, t, seed=7, masks=3))(tokens)
  np.testing.assert_allclose(ensembled, np.mean(singles, axis=0), rtol=1e-5, atol=1e-5)
  assert not np.allclose(singles[0], singles[1], atol=1e-3)  # the masks differ
  unmasked = probe.masked_features(model, tokens, seed=7, masks=0)
  np.testing.assert_array_equal(unmasked, model.features(tokens))
  assert not np.allclose(unmasked, ensembled, atol=1e-3)
  # Deterministic per seed.
  np.testing.assert_array_equal(ensembled, probe.masked_features(model, tokens, seed=7, masks=3))


def test_bert_class_logits_ensemble_is_the_mean_of_single_mask_passes():
  from igpt_jax import objectives, train
  cfg = ModelConfig(num_layers=2, d_model=32, num_heads=4, vocab_size=16, seq_len=36,
                    objective="bert", num_classes=5)
  model = randomise(ImageGPT(cfg, rngs=nnx.Rngs(4)), scale=0.5)
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 16, (4, 36)), jnp.int32)
  singles = [model.logits_and_class_logits(tokens, objectives.bert_mask(
      jax.random.fold_in(jax.random.key(9), i), tokens.shape))[1] for i in range(3)]
  ensembled = jax.jit(lambda t: train.ensembled_class_logits(model, t, 9, 3))(tokens)
  np.testing.assert_allclose(ensembled, np.mean(singles, axis=0), rtol=1e-5, atol=1e-5)
  assert not np.allclose(singles[0], singles[2], atol=1e-4)


def test_completions_are_drawn_from_every_class():
  """A folder's test files come class by class: the first 4 were all class 0."""
  labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 2, 2])
  chosen = sample.across_classes(labels, 4)
  assert chosen.tolist() == [0, 1, 5, 8]  # each class's first, then class 0's second
  assert sorted(set(labels[sample.across_classes(labels, 3)])) == [0, 1, 2]
  assert sample.across_classes(np.full(5, -1), 3).tolist() == [0, 1, 2]  # unlabelled: in order
  assert len(sample.across_classes(labels, 50)) == 10


def test_a_bias_free_head_fit_is_linear_on_unit_scaled_features():
  """fit_classifier(intercept=False), the fine-tuning head of finetune.head_bias=False: logits
  are x / std @ w alone (no mean, no bias) -- what transformers' classifier computes -- and on
  features far from zero (mean 30 std, as early pooled features are) it gets within 2 points
  of the fit with an intercept."""
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(4, 24))

  def split(n):
    y = rng.integers(0, 4, n)
    return (30.0 + centres[y] * 0.6 + rng.normal(size=(n, 24))).astype(np.float32), y

  train, val = split(800), split(800)
  with_bias = logreg.fit_classifier(train, val, 4, (1e-3,), steps=50)
  free = logreg.fit_classifier(train, val, 4, (1e-3,), steps=50, intercept=False)
  assert not free["b"].any() and not free["mean"].any()
  accuracy = np.mean(np.argmax(val[0] / free["std"] @ free["w"], -1) == val[1])
  assert accuracy == pytest.approx(free["val_accuracy"])
  assert accuracy > with_bias["val_accuracy"] - 0.02, (accuracy, with_bias["val_accuracy"])
