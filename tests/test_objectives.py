"""Losses: what each one counts, and the units they are reported in."""
import math

import jax
import jax.numpy as jnp
import numpy as np

from igpt_jax import objectives


def test_ar_loss_of_uniform_logits_is_log_vocab():
  tokens = jax.random.randint(jax.random.key(0), (4, 10), 0, 512)
  assert abs(float(objectives.ar_loss(jnp.zeros((4, 10, 512)), tokens)) - math.log(512)) < 1e-5


def test_bert_mask_rate_and_independence():
  mask = objectives.bert_mask(jax.random.key(0), (256, 1024))
  assert mask.dtype == jnp.bool_
  assert abs(float(mask.mean()) - 0.15) < 0.005
  # Independent positions: per-image counts vary (not a fixed 15% per image).
  assert float(mask.sum(axis=1).std()) > 1.0


def test_bert_loss_counts_only_masked_positions():
  logits = jax.random.normal(jax.random.key(1), (2, 8, 16))
  tokens = jax.random.randint(jax.random.key(2), (2, 8), 0, 16)
  mask = jnp.zeros((2, 8), bool).at[:, 3].set(True)
  base = objectives.bert_loss(logits, tokens, mask)
  # Changing unmasked positions' logits leaves the loss alone...
  np.testing.assert_allclose(objectives.bert_loss(logits.at[:, 0].add(5.0), tokens, mask), base)
  # ...and the loss is the NLL at the masked position.
  expected = jnp.mean(objectives.token_nll(logits, tokens)[:, 3])
  np.testing.assert_allclose(base, expected, rtol=1e-6)
  # An image without masked positions contributes zero instead of NaN.
  assert np.isfinite(float(objectives.bert_loss(logits, tokens, jnp.zeros((2, 8), bool))))


def test_clf_and_finetune_loss():
  logits = jnp.array([[2.0, 0.0], [0.0, 2.0]])
  labels = jnp.array([0, 1])
  clf = objectives.clf_loss(logits, labels)
  np.testing.assert_allclose(clf, math.log(1 + math.exp(-2.0)), rtol=1e-6)
  assert float(objectives.accuracy(logits, labels)) == 1.0
  assert float(objectives.finetune_loss(3.0, clf, gen_weight=0.0)) == float(clf)
  np.testing.assert_allclose(objectives.finetune_loss(3.0, clf, gen_weight=0.5), 1.5 + clf)


def test_units():
  assert abs(objectives.bits_per_token(math.log(2.0)) - 1.0) < 1e-12
  assert abs(objectives.bits_per_dim(3 * math.log(2.0), channels=3) - 1.0) < 1e-12
