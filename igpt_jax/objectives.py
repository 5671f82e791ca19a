"""The paper's losses: L_AR, L_BERT, L_CLF and the fine-tuning objective L_GEN + L_CLF.

All losses are float32 means in nats. `bits_per_dim` converts a per-token loss the way image
likelihood papers report it.
"""

import math

import jax
import jax.numpy as jnp
import optax

BERT_MASK_PROB = 0.15


def token_nll(logits, tokens):
  """Per-position negative log-likelihood in nats, [B, N]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens)


def ar_loss(logits, tokens):
  """L_AR: mean next-token NLL over all positions (the model already shifted its inputs)."""
  return jnp.mean(token_nll(logits, tokens))


def bert_mask(rng, shape, prob: float = BERT_MASK_PROB):
  """Masks each position independently with probability `prob`; True marks a masked position."""
  return jax.random.bernoulli(rng, prob, shape)


def mask_ensemble(fn, shape, seed: int, masks: int):
  """The mean of fn(mask) over `masks` BERT masks of `shape` drawn as in pretraining (the
  paper's mask ensembling); mask i comes from key(seed) folded with i, so a seed gives the same
  masks every time. One traced fn, looped over the masks."""
  def mask(i):
    return bert_mask(jax.random.fold_in(jax.random.key(seed), i), shape)

  first = fn(mask(0))
  total = jax.lax.fori_loop(1, masks, lambda i, acc: acc + fn(mask(i)), first)
  return total / jnp.float32(masks)


def bert_loss(logits, tokens, mask):
  """L_BERT: NLL on masked positions only, averaged per image then over the batch (as released).

  An image with no masked position contributes zero rather than a division by zero.
  """
  mask = mask.astype(jnp.float32)
  per_image = jnp.sum(token_nll(logits, tokens) * mask, axis=1) / jnp.maximum(
      jnp.sum(mask, axis=1), 1.0)
  return jnp.mean(per_image)


def clf_loss(class_logits, labels):
  """L_CLF: softmax cross-entropy of the class head."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      class_logits.astype(jnp.float32), labels))


def finetune_loss(gen_loss, class_loss, gen_weight: float = 1.0):
  """The paper's fine-tuning objective L_GEN + L_CLF; gen_weight=0 gives plain L_CLF."""
  return gen_weight * gen_loss + class_loss


def accuracy(class_logits, labels):
  return jnp.mean((jnp.argmax(class_logits, axis=-1) == labels).astype(jnp.float32))


def bits_per_token(nats):
  return nats / math.log(2.0)


def bits_per_dim(nats_per_token, channels: int):
  """Bits per sub-pixel dimension: one token is one pixel of `channels` colour dimensions.

  This is the usual image-likelihood unit (PixelCNN, Sparse Transformer), here measured on
  palette-quantised images, so it is not comparable with numbers on raw 8-bit pixels.
  """
  return nats_per_token / (math.log(2.0) * channels)
