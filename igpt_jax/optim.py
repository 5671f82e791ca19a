"""The optimiser: AdamW (b2=0.95 as in the paper), linear warmup + cosine decay to zero,
global-norm clipping. Gradient accumulation lives in the train step (train.py), where the
micro-batches are a scan, so it stays deterministic and sharded.

The schedule is driven by the train state's step counter, not by a count inside the optimizer
state: a step that is skipped (non-finite, see train.py) keeps the optimizer state as it was,
and an internal count would fall behind the step, so the schedule would no longer end at the
last step and the logged learning rate would not be the applied one. `make_optimizer` gives
updates at unit learning rate; the train step multiplies them by `schedule(step)`.
"""

import jax
import optax


def schedule(train_config):
  """step -> the schedule's factor in [0, 1]: warmup to 1, then cosine decay to 0 at the end."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=1.0,
      warmup_steps=max(1, min(train_config.warmup_steps, train_config.steps)),
      decay_steps=max(train_config.steps, train_config.warmup_steps + 1), end_value=0.0)


def make_optimizer(train_config, head_lr: float | None = None) -> optax.GradientTransformation:
  """AdamW on every parameter at its peak learning rate (times `schedule(step)` in the train
  step); with `head_lr` (fine-tuning), the class head gets its own peak: a head starting from a
  probe's solution and a pretrained trunk want different step sizes, and the trunk may be
  frozen (lr 0) while the head learns."""
  chain = []
  if train_config.grad_clip and train_config.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(train_config.grad_clip))
  # AdamW spelt out: decoupled weight decay, then the (negated) peak learning rate. (optax.
  # multi_transform would put param-shaped placeholders in the state, which the sharding of the
  # state cannot map.)
  chain += [optax.scale_by_adam(b1=train_config.b1, b2=train_config.b2),
            optax.add_decayed_weights(train_config.weight_decay, mask=decay_mask)]
  if head_lr is None:
    chain.append(optax.scale(-train_config.lr))
    return optax.chain(*chain)
  is_head = lambda params: jax.tree.map(lambda label: label == "head", head_labels(params))  # noqa: E731
  is_trunk = lambda params: jax.tree.map(lambda label: label == "trunk", head_labels(params))  # noqa: E731
  chain += [optax.masked(optax.scale(-train_config.lr), is_trunk),
            optax.masked(optax.scale(-head_lr), is_head)]
  return optax.chain(*chain)


HEAD = {"class_head", "class_bias", "class_shift", "class_scale"}  # shift, scale: no gradient


def head_labels(params):
  """'head' for the class head's parameters, 'trunk' for the rest."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "head" if path[-1].key in HEAD else "trunk", params)


# Weight decay applies to projection matrices only: not to embeddings, norm gains or biases.
DECAYED = {"q", "k", "v", "attn_out", "fc", "fc_out", "head", "class_head"}


def decay_mask(params):
  """params: the plain nested dict of the train state; decided by each parameter's own name."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in DECAYED, params)
