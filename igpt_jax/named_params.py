"""Parameters by name ({'blocks/q': array, ...}, the stacked layer axis leading): the bridge
between our model's tree and the released weights' layouts (OpenAI's TF1 checkpoints, Hugging
Face's ImageGPT), each of which maps its own names onto these."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from igpt_jax import model as model_lib


def from_model(model: model_lib.ImageGPT) -> dict[str, Any]:
  """Parameters as {'blocks/q': array, ...}; the stacked layer axis stays leading."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {"/".join(map(str, path)): var.get_value() for path, var in flat}


def to_model(cfg: model_lib.ModelConfig, arrays: dict[str, Any]) -> model_lib.ImageGPT:
  """Builds a model whose parameters are `arrays` (the names of `from_model`), checked whole.

  Nothing is initialised first, so converting a large checkpoint allocates each array once.
  """
  graphdef, state = nnx.split(model_lib.abstract_model(cfg))
  flat = nnx.to_flat_state(state)
  expected = {"/".join(map(str, path)): var for path, var in flat}
  missing, unexpected = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
  if missing or unexpected:
    raise ValueError(f"Parameters do not match the model shape: missing {missing}, "
                     f"unexpected {unexpected}.")
  filled = []
  for path, var in flat:
    name = "/".join(map(str, path))
    value = jnp.asarray(arrays[name], jnp.float32)
    if value.shape != var.get_value().shape:
      raise ValueError(f"Parameter {name} has shape {value.shape}; the model expects "
                       f"{var.get_value().shape}.")
    filled.append((path, var.replace(value)))
  return nnx.merge(graphdef, nnx.from_flat_state(filled))
