"""The fine-tuning class head's starting point: a linear probe on the features it reads (LP-FT).

A zero head trained with Adam on a decaying schedule moves slowly on pooled features that are
uncentred and ill-conditioned, and full fine-tuning then loses to a probe on its own starting
features. So, before the first step, the head is set to the L-BFGS logistic regression that the
probe stage fits on the last layer (the same train, validation and L2 choices), in the probe's
own coordinates: the head reads the mean-pooled final norm `p` standardised as
`(p - class_shift) * class_scale`, with the probe's train mean and 1/std (fixed from then on),
and its weights and bias are the probe's. A head without a bias (finetune.head_bias=False, the
release's) cannot centre either (a shift is a bias): its probe is fitted without an intercept
on `p * class_scale`, class_shift stays 0. At step 0 the fine-tuned model classifies exactly as
that probe does, and Adam then steps in well-conditioned coordinates.
"""

from __future__ import annotations

import numpy as np

from igpt_jax import distributed
from igpt_jax import sharding as sharding_lib


def pooled_features(trainer, params, data, tokenizer, config) -> np.ndarray:
  """[N, d_model] float32: the class head's input for every example of `data`, in order, on
  every process."""
  from igpt_jax import evaluation
  return evaluation.per_example(trainer, trainer.pooled_fn, params, data, tokenizer,
                                config).astype(np.float32)


def fit(trainer, params, splits: dict, tokenizer, config, log=print) -> tuple[dict, dict]:
  """`params` with class_head/class_bias set to the probe on the pooled features of
  splits['train'] (L2 chosen on splits['validation']); and what was fitted (for the log and
  the metrics): l2, train and validation accuracy, examples."""
  from igpt_jax import logreg
  d = trainer.cfg.d_model
  train, val = splits["train"], splits["validation"]
  budget = config.probe.max_memory_mb * 2**20 // (4 * d * 3)  # x, standardised x, and a copy
  if len(train) > budget:
    idx = np.sort(np.random.default_rng(config.seed).permutation(len(train))[:budget])
    train = train.subset(idx, f"{train.name}[{budget} examples]")
    log(f"finetune: the head's probe uses {budget} train examples (probe.max_memory_mb="
        f"{config.probe.max_memory_mb}).")
  log(f"finetune: fitting the class head as a linear probe on the pooled features of "
      f"{len(train)} train and {len(val)} validation images...")
  xt = pooled_features(trainer, params, train, tokenizer, config)
  xv = pooled_features(trainer, params, val, tokenizer, config)
  distributed.PREEMPTION.check("finetune")  # before the fit, which cannot stop midway
  head = logreg.fit_classifier((xt, train.labels), (xv, val.labels),
                               trainer.cfg.num_classes, tuple(config.probe.l2),
                               steps=config.probe.steps, intercept=trainer.cfg.class_bias)
  values = {"class_head": head["w"].T, "class_shift": head["mean"],
            "class_scale": 1.0 / head["std"]}
  if trainer.cfg.class_bias:
    values["class_bias"] = head["b"]
  shardings = {k: params[k].sharding for k in values}
  for key, value in values.items():
    value = np.ascontiguousarray(value, np.float32)
    params[key] = sharding_lib.place(value, shardings[key])
  info = {k: head[k] for k in ("l2", "train_accuracy", "val_accuracy")}
  info["train_examples"], info["validation_examples"] = len(xt), len(xv)
  log(f"finetune: class head = probe on the pooled features (l2={info['l2']:g}): train "
      f"accuracy {info['train_accuracy']:.4f}, validation {info['val_accuracy']:.4f}.")
  return params, info
