"""Rematerialisation by name: `model.remat` ('none', 'full', a jax.checkpoint_policies name,
'save:NAME,...', 'offload:NAME,...') -> the jax.checkpoint policy a layer body runs under.
The names are the checkpoint names the model and attention give their activations."""

from __future__ import annotations

import jax

from igpt_jax import config as config_lib


def remat_policy(spec: str):
  """model.remat -> (rematerialise?, policy): 'none', 'full' (save nothing), a
  jax.checkpoint_policies name, 'save:NAME,...' (save only these named activations: query, key,
  value, attention_out, mlp_hidden) or 'offload:NAME,...' (those to host memory, TPU)."""
  if spec == "none":
    return False, None
  if spec == "full":
    return True, None
  named = config_lib.remat_names(spec)
  if named:
    kind, names = named
    if kind == "save":
      return True, jax.checkpoint_policies.save_only_these_names(*names)
    return True, jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=list(names),
        offload_src="device", offload_dst="pinned_host")
  return True, getattr(jax.checkpoint_policies, spec)  # config.model_problem checked the name


def wrap(fn, spec: str, scanned: bool):
  """The layer body under the remat policy. Inside a scan, prevent_cse=False: the loop already
  keeps XLA from merging the recomputation into the forward pass, and the barriers it would
  add cost time (jax.checkpoint's docs)."""
  remat, policy = remat_policy(spec)
  return jax.checkpoint(fn, policy=policy, prevent_cse=not scanned) if remat else fn
