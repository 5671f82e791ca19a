"""Device mesh, logical-axis rules, multi-host start-up and host -> global batches.

Parameters carry logical axis names (model.py); one rules table maps each name to mesh axes
(`data`, `fsdp`, `tensor`), so data parallel, FSDP/ZeRO-3, tensor parallel and their mixes are
the same code with a different mesh shape and table. The train step is plain `jax.jit` with
explicit in/out shardings built here.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from igpt_jax.config import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. The batch is split over data and fsdp (FSDP is data parallel with
# sharded parameters); weights are split along `embed` by fsdp and along heads/mlp/vocab by
# tensor. Names not listed are replicated.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("head_dim", None),
    ("positions", None),
    ("classes", None),
)


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
  sizes = {axis: int(getattr(mesh_config, axis)) for axis in MESH_AXES}
  unknown = [a for a, s in sizes.items() if s == -1]
  if len(unknown) > 1:
    raise UserError(f"At most one mesh axis may be -1, got {sizes}.")
  known = math.prod(s for s in sizes.values() if s != -1)
  if unknown:
    if num_devices % known:
      raise UserError(f"{num_devices} devices cannot fill mesh {sizes}: set --config.mesh.* so "
                      "that the sizes multiply to a divisor of the device count.")
    sizes[unknown[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise UserError(f"Mesh {sizes} needs {math.prod(sizes.values())} devices; "
                    f"{num_devices} are available: change --config.mesh.*.")
  return sizes


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all), axis types Auto."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def rules_from_config(config) -> tuple:
  rules = config.mesh.get("rules", None) if hasattr(config, "mesh") else None
  return tuple(tuple(r) for r in rules) if rules else DEFAULT_RULES


def logical_to_spec(names, rules=DEFAULT_RULES, mesh=None) -> P:
  """Logical axis names -> PartitionSpec; a mesh axis is used at most once per array, and axes
  whose dimension the mesh axis does not divide are left to the caller (see `shardings_for`)."""
  table = dict(rules)
  used, spec = set(), []
  for name in names:
    target = table.get(name)
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape[a] > 1))
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*spec)


def shardings_for(abstract_tree, mesh, rules=DEFAULT_RULES):
  """NamedShardings for every nnx Variable of an abstract state, from its logical names.

  A dimension that its mesh axes do not divide evenly is replicated instead (with no error):
  small models on big meshes still compile, only less sharded.
  """
  def one(var):
    names = var.get_metadata().get("out_sharding") or (None,) * len(var.get_value().shape)
    spec = logical_to_spec(names, rules, mesh)
    shape = var.get_value().shape
    fixed = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
      size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
      fixed.append(axes if dim % size == 0 else None)
    return NamedSharding(mesh, P(*fixed))

  return jax.tree.map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh, rules=DEFAULT_RULES, ndim: int = 2) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh))


def host_rows(mesh, rules, global_rows: int) -> tuple[int, int]:
  """[lo, hi): the rows of a global batch that this process's devices hold.

  Derived from the batch sharding, not from the process index: processes whose devices hold
  replicas of the same rows (tensor parallelism across hosts) get the same range.
  """
  sharding = batch_sharding(mesh, rules, 1)
  spans = {(s[0].indices(global_rows)[:2])
           for s in sharding.addressable_devices_indices_map((global_rows,)).values()}
  lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
  if sum(b - a for a, b in spans) != hi - lo:
    raise ValueError(f"This process's devices hold non-contiguous batch rows {sorted(spans)}; "
                     "order the mesh so that each host's devices are adjacent.")
  return lo, hi


def global_batch(local: dict, mesh, rules=DEFAULT_RULES, global_rows: int | None = None) -> dict:
  """Rows [lo, hi) of the batch held by this process (see `host_rows`) -> global jax.Arrays
  sharded over the batch axes. `global_rows` is the global batch size (default: local rows x
  processes, right only when every process holds distinct rows)."""
  out = {}
  for key, value in local.items():
    value = np.asarray(value)
    if value.ndim == 0:
      continue
    rows = global_rows or value.shape[0] * jax.process_count()
    lo, hi = host_rows(mesh, rules, rows)
    if value.shape[0] != hi - lo:
      raise ValueError(f"{key}: this process feeds rows [{lo}, {hi}) of {rows}, got "
                       f"{value.shape[0]} rows.")
    out[key] = jax.make_array_from_callback(
        (rows, *value.shape[1:]), batch_sharding(mesh, rules, value.ndim),
        lambda index, v=value, lo=lo: v[(slice(index[0].indices(rows)[0] - lo,
                                               index[0].indices(rows)[1] - lo),) + index[1:]])
  return out


# -- activations ------------------------------------------------------------------------------

_ACTIVE_RULES = contextvars.ContextVar("igpt_activation_rules", default=None)


@contextlib.contextmanager
def activation_sharding(mesh, rules=DEFAULT_RULES):
  """Within this context, `constrain` pins activations to the rules (set while tracing)."""
  token = _ACTIVE_RULES.set(rules)
  try:
    with jax.set_mesh(mesh):
      yield
  finally:
    _ACTIVE_RULES.reset(token)


def constrain(x, names):
  """with_sharding_constraint by logical names; a no-op outside `activation_sharding`.

  Without it, FSDP lets XLA keep the batch replicated and split activations along `embed`
  like the weights, which multiplies activation memory by the number of devices.
  """
  rules = _ACTIVE_RULES.get()
  mesh = jax.sharding.get_abstract_mesh()
  if rules is None or mesh.empty:
    return x
  spec = []
  for dim, axes in zip(x.shape, logical_to_spec(names, rules, mesh)):
    size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
    spec.append(axes if dim % size == 0 else None)
  return jax.lax.with_sharding_constraint(x, P(*spec))
