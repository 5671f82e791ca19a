"""Evaluation during and after training: held-out NLL, bits/dim and accuracy summed on the
devices, and which evaluations a step owes (validation on its own interval, fine-tuning's test
split at the end)."""

from __future__ import annotations

import itertools

import jax
import numpy as np

from igpt_jax import distributed
from igpt_jax import objectives
from igpt_jax import sharding as sharding_lib
from igpt_jax import train as train_lib


def evaluate(trainer: train_lib.Trainer, params, eval_data, tokenizer, config,
             max_batches: int = 0, prefix: str = "eval") -> dict:
  """Held-out mean NLL (nats/token) and bits/dim; for a finetuning trainer also accuracy.
  Keys are `{prefix}_loss`, `{prefix}_bits_per_dim`, `{prefix}_accuracy`.

  Every process runs the same number of padded global batches (its rows of each)."""
  from igpt_jax.data import pipeline
  batch_size = trainer.train_cfg.batch_size
  rows = sharding_lib.host_rows(trainer.mesh, trainer.rules, batch_size)
  sums = None
  batches = pipeline.eval_batches(eval_data, batch_size=batch_size, rows=rows,
                                  augment=config.data.augment)
  if max_batches:
    batches = itertools.islice(batches, max_batches)
  # A whole split is long: a stop (every process at the same batch) ends it, and the caller
  # keeps what it has (the training loop saves its step).
  for batch in distributed.PREEMPTION.batches(batches, config.stage):
    g = sharding_lib.global_batch({k: batch[k] for k in ("images", "boxes", "labels", "mask")},
                                  trainer.mesh, trainer.rules, batch_size)
    tokens = tokenizer(g["images"], g["boxes"])
    out = trainer.eval_fn(params, tokens, g["labels"], g["mask"])
    sums = out if sums is None else _add(sums, out)  # on the device: no wait per batch
    if one_in_flight(trainer.mesh):
      jax.block_until_ready(sums)
  # One wait per evaluation: replicated scalars, every process holds them whole.
  total = {"nll": 0.0, "tokens": 0.0, "correct": 0.0, "examples": 0.0,
           **{k: float(v) for k, v in jax.device_get(sums or {}).items()}}
  nats = total["nll"] / max(total["tokens"], 1.0)
  out = {f"{prefix}_loss": nats,
         f"{prefix}_bits_per_dim": objectives.bits_per_dim(nats, config.data.channels)}
  if trainer.stage == "finetune":
    out[f"{prefix}_accuracy"] = total["correct"] / max(total["examples"], 1.0)
    out[f"{prefix}_examples"] = int(total["examples"])
  return out


def per_example(trainer: train_lib.Trainer, fn, params, data, tokenizer, config) -> np.ndarray:
  """fn(params, tokens) -> [B, ...] for every example of `data`, in order, on every process
  (each process feeds its rows of each global batch, as `evaluate` does; the padded tail is
  dropped)."""
  from igpt_jax.data import pipeline
  batch_size = trainer.train_cfg.batch_size
  rows = sharding_lib.host_rows(trainer.mesh, trainer.rules, batch_size)
  parts, n = [], len(data)
  batches = pipeline.eval_batches(data, batch_size=batch_size, rows=rows,
                                  augment=config.data.augment)
  for j, batch in enumerate(distributed.PREEMPTION.batches(batches, trainer.stage)):
    g = sharding_lib.global_batch({k: batch[k] for k in ("images", "boxes")},
                                  trainer.mesh, trainer.rules, batch_size)
    out = fn(params, tokenizer(g["images"], g["boxes"]))
    parts.append(distributed.to_host(out)[:n - j * batch_size])
  return np.concatenate(parts)


@jax.jit
def _add(a: dict, b: dict) -> dict:
  return jax.tree.map(lambda x, y: x + y, a, b)


def one_in_flight(mesh) -> bool:
  """XLA's CPU collectives deadlock when programs queue up (see logreg.fit_streamed): on a CPU
  mesh of several devices each step waits for the last. Accelerators keep async dispatch."""
  return mesh.devices.flat[0].platform == "cpu" and mesh.devices.size > 1


def eval_split(config, log=print):
  """Training-time evaluation reads validation (test is for final numbers), or test when
  data.validation_fraction is 0."""
  from igpt_jax.data import sources
  if sources.validation_fraction(config) == 0:
    log("data.validation_fraction=0: evaluating on the test split during training.")
    return sources.load(config, "test", log=log)
  return sources.load(config, "validation", log=log)


def eval_due(trainer, step: int, is_last: bool) -> bool:
  """Validation every eval_every steps and at the end, whatever log_every is (a step that
  evaluates is logged too)."""
  every = trainer.train_cfg.eval_every
  return bool(every) and (step % every == 0 or is_last)


def evaluations_due(trainer, params, step: int, is_last: bool, eval_data, test_data, tokenizer,
                    config) -> dict:
  """The evaluations due at `step`: validation (`eval_due`); for fine-tuning, the test split
  at the end (the final number)."""
  out = {}
  if eval_due(trainer, step, is_last):
    out.update(evaluate(trainer, params, eval_data, tokenizer, config,
                        trainer.train_cfg.eval_batches))
  if trainer.stage == "finetune" and is_last:
    out.update(evaluate(trainer, params, test_data(), tokenizer, config, prefix="test"))
  return out


def has_final(result: dict, trainer) -> bool:
  """Whether a last step's result holds the evaluations due at the end."""
  if trainer.train_cfg.eval_every and "eval_loss" not in result:
    return False
  return trainer.stage != "finetune" or "test_accuracy" in result
