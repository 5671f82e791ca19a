"""The optimiser: AdamW (b2=0.95 as in the paper), linear warmup + cosine decay to zero,
global-norm clipping. Gradient accumulation lives in the train step (train.py), where the
micro-batches are a scan, so it stays deterministic and sharded."""

import optax


def learning_rate(train_config):
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_config.lr,
      warmup_steps=max(1, min(train_config.warmup_steps, train_config.steps)),
      decay_steps=max(train_config.steps, train_config.warmup_steps + 1), end_value=0.0)


def make_optimizer(train_config) -> optax.GradientTransformation:
  chain = []
  if train_config.grad_clip and train_config.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(train_config.grad_clip))
  chain.append(optax.adamw(learning_rate(train_config), b1=train_config.b1, b2=train_config.b2,
                           weight_decay=train_config.weight_decay, mask=decay_mask))
  return optax.chain(*chain)


# Weight decay applies to projection matrices only: not to embeddings, norm gains or biases.
DECAYED = {"q", "k", "v", "attn_out", "fc", "fc_out", "head", "class_head"}


def decay_mask(params):
  """params: the plain nested dict of the train state; decided by each parameter's own name."""
  import jax
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in DECAYED, params)
