"""Device mesh, logical-axis rules, multi-host start-up and host -> global batches.

Parameters carry logical axis names (model.py); one rules table maps each name to mesh axes
(`data`, `fsdp`, `tensor`), so data parallel, FSDP/ZeRO-3, tensor parallel and their mixes are
the same code with a different mesh shape and table. The train step is plain `jax.jit` with
explicit in/out shardings built here.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
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
  """A (data, fsdp, tensor) mesh over `devices` (default: all), axis types Auto.

  mesh.data/fsdp/tensor describe one slice. With mesh.slices = S > 1 the data axis is S times
  longer and spans the slices (data parallelism over the data-centre network, DCN), while fsdp
  and tensor stay within a slice's chip network: `mesh_utils.create_hybrid_device_mesh`. A
  TPU's devices are ordered by their place in the chip network (`jax.make_mesh`), so the rows a
  host feeds need not be contiguous (see `host_rows`).
  """
  devices = list(jax.devices() if devices is None else devices)
  slices = int(mesh_config.get("slices", 1) or 1)
  if slices < 1 or len(devices) % slices:
    raise UserError(f"--config.mesh.slices={slices} does not divide the {len(devices)} devices.")
  sizes = mesh_shape(mesh_config, len(devices) // slices)
  shape = tuple(sizes[a] for a in MESH_AXES)
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if slices > 1:
    from jax.experimental import mesh_utils
    # Where the devices report no slices (CPU devices all say slice 0), each process stands
    # for a slice: a rehearsal of multislice on processes.
    by_process = len({getattr(d, "slice_index", 0) for d in devices}) != slices
    if by_process and len({d.process_index for d in devices}) != slices:
      raise UserError(f"--config.mesh.slices={slices}: these devices report no slice; "
                      f"multislice needs a TPU (or, for a rehearsal, one process per slice).")
    grid = mesh_utils.create_hybrid_device_mesh(shape, (slices, 1, 1), devices,
                                                process_is_granule=by_process)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)
  if devices[0].platform == "tpu" or len(devices) == len(jax.devices()):
    try:
      return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=axis_types)
    except NotImplementedError:
      # A mesh axis that is no product of the slice's physical axes (tensor=8 on a 4x4x4
      # v5p): split a physical axis rather than refuse; that axis's rings get longer.
      from jax.experimental import mesh_utils
      grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
      return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)
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


def axes_size(mesh, axes) -> int:
  """How many ways a PartitionSpec entry (None, one mesh axis or a tuple of them) splits a
  dimension on `mesh`."""
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))


def shardings_for(abstract_tree, mesh, rules=DEFAULT_RULES):
  """NamedShardings for every nnx Variable of an abstract state, from its logical names.

  A dimension that its mesh axes do not divide evenly is replicated instead: small models on
  big meshes still compile, only less sharded (`undivided` names them, and the stages say so).
  """
  return jax.tree.map(lambda var: NamedSharding(mesh, _param_spec(var, mesh, rules)[0]),
                      abstract_tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def undivided(abstract_tree, mesh, rules=DEFAULT_RULES) -> str:
  """'' when every parameter dimension is split as the rules say; else one sentence naming the
  dimensions the mesh does not divide, which stay whole on every device of that mesh axis (a
  hand-set mesh that multiplies their memory without a word)."""
  found: dict = {}
  for var in jax.tree.leaves(abstract_tree, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    for name, dim, axes in _param_spec(var, mesh, rules)[1]:
      found.setdefault((name, dim, axes), 0)
      found[(name, dim, axes)] += 1
  parts = [f"{name} ({dim}) by mesh.{'x'.join((axes,) if isinstance(axes, str) else axes)}="
           f"{axes_size(mesh, axes)} ({count} parameter{'s' if count > 1 else ''})"
           for (name, dim, axes), count in found.items()]
  if not parts:
    return ""
  return (f"the mesh does not divide {'; '.join(parts)}: those parameters are whole on every "
          "device of that axis instead of split (their memory multiplied by its size); choose "
          "mesh sizes that divide them.")


def _param_spec(var, mesh, rules) -> tuple[P, list]:
  """A parameter's PartitionSpec from its logical names, and the (name, size, mesh axes) of
  the dimensions left whole because the axes do not divide them."""
  shape = var.get_value().shape
  names = var.get_metadata().get("out_sharding") or (None,) * len(shape)
  spec = tuple(logical_to_spec(names, rules, mesh))
  fixed, dropped = [], []
  for dim, name, axes in zip(shape, names, spec + (None,) * (len(shape) - len(spec))):
    if dim % axes_size(mesh, axes) == 0:
      fixed.append(axes)
    else:
      fixed.append(None)
      dropped.append((name, dim, axes))
  return P(*fixed), dropped


def batch_sharding(mesh, rules=DEFAULT_RULES, ndim: int = 2) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh))


def rows_by_process(mesh, rules, global_rows: int) -> dict[int, np.ndarray]:
  """Process index -> the sorted rows of a global batch that its devices hold.

  Derived from the batch sharding, whatever the device order: on a TPU slice `jax.make_mesh`
  orders devices by their place in the chip network, so a host's rows are in general not one
  contiguous range (v5litepod-16: host 0 holds rows 0-3, 12-13 and 30-31 of 32). Processes
  whose devices hold replicas of the same rows (tensor parallelism across hosts) get the same
  set. Works on compile-only devices too, so `plan` can check every host of a slice.
  """
  return _rows_by_process(batch_sharding(mesh, rules, 1), global_rows)


@functools.lru_cache(maxsize=32)
def _rows_by_process(sharding: NamedSharding, global_rows: int) -> dict[int, np.ndarray]:
  """Cached: the input path asks for every batch, and the answer walks every device of the
  pod. Keyed by the (hashable) batch sharding; the arrays are read-only, being shared."""
  held: dict[int, set] = {}
  for device, index in sharding.devices_indices_map((global_rows,)).items():
    start, stop, _ = index[0].indices(global_rows)
    held.setdefault(device.process_index, set()).update(range(start, stop))
  out = {p: np.fromiter(sorted(rows), np.int64) for p, rows in held.items()}
  for rows in out.values():
    rows.setflags(write=False)
  return out


def host_rows(mesh, rules, global_rows: int, process_index: int | None = None) -> np.ndarray:
  """The sorted rows of a global batch that this process's devices hold (see
  `rows_by_process`); the input pipeline reads exactly these examples."""
  process = jax.process_index() if process_index is None else process_index
  rows = rows_by_process(mesh, rules, global_rows).get(process)
  if rows is None:
    raise ValueError(f"Process {process} holds no device of mesh {dict(mesh.shape)}.")
  return rows


def check_row_assignment(mesh, rules, global_rows: int) -> dict:
  """Checks, for every host, that the rows it feeds are those its devices hold and that all hosts
  together feed each row once per replica. Returns a summary for `plan`'s JSON."""
  sharding = batch_sharding(mesh, rules, 1)
  by_process = rows_by_process(mesh, rules, global_rows)
  copies = np.zeros(global_rows, np.int64)  # devices holding each row
  for device, index in sharding.devices_indices_map((global_rows,)).items():
    start, stop, _ = index[0].indices(global_rows)
    fed = by_process[device.process_index]
    if not np.all(np.isin(np.arange(start, stop), fed)):
      raise AssertionError(f"process {device.process_index} does not feed rows {start}-{stop} "
                           f"that its device {device.id} holds")
    copies[start:stop] += 1
  replicas = mesh.devices.size // batch_shards(mesh, rules)
  if not np.all(copies == replicas):
    raise AssertionError(f"rows are held {sorted(set(copies.tolist()))} times; {replicas} expected")
  distinct = {tuple(r.tolist()) for r in by_process.values()}
  contiguous = all(r[-1] - r[0] + 1 == len(r) for r in by_process.values())
  return {"hosts": len(by_process), "rows_per_host": int(len(next(iter(by_process.values())))),
          "distinct_row_sets": len(distinct), "contiguous": bool(contiguous),
          "replicas": int(replicas), "checked": True}


def batch_shards(mesh, rules=DEFAULT_RULES) -> int:
  """How many ways the batch is split (the product of the mesh axes it is sharded over)."""
  return math.prod(mesh.shape[a] for a in _batch_axes(mesh, rules))


def _batch_axes(mesh, rules) -> tuple:
  spec = batch_sharding(mesh, rules, 1).spec[0]
  return (spec,) if isinstance(spec, str) else tuple(spec or ())


def place(value: np.ndarray, sharding) -> jax.Array:
  """A host array every process holds whole -> a global array laid out by `sharding` (each
  device takes its block; works across processes, where device_put of a host array does not)."""
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def global_batch(local: dict, mesh, rules=DEFAULT_RULES, global_rows: int | None = None) -> dict:
  """This process's rows of a batch (in the order of `host_rows`) -> global jax.Arrays sharded
  over the batch axes. `global_rows` is the global batch size (default: local rows x
  processes, right only when every process holds distinct rows)."""
  out = {}
  for key, value in local.items():
    value = np.asarray(value)
    if value.ndim == 0:
      continue
    rows = global_rows or value.shape[0] * jax.process_count()
    mine = host_rows(mesh, rules, rows)
    if value.shape[0] != len(mine):
      raise ValueError(f"{key}: this process feeds {len(mine)} rows of {rows}, got "
                       f"{value.shape[0]} rows.")

    out[key] = jax.make_array_from_callback(
        (rows, *value.shape[1:]), batch_sharding(mesh, rules, value.ndim),
        lambda index, v=value, mine=mine, rows=rows: device_part(v, mine, index, rows))
  return out


def device_part(local: np.ndarray, mine: np.ndarray, index: tuple, global_rows: int) -> np.ndarray:
  """The block of a global batch one device holds (`index`: its slices), cut from this
  process's `local` rows, which are the global rows `mine` in order."""
  start, stop, _ = index[0].indices(global_rows)
  wanted = np.arange(start, stop)
  at = np.searchsorted(mine, wanted)
  if np.any(at >= len(mine)) or np.any(mine[np.minimum(at, len(mine) - 1)] != wanted):
    raise ValueError(f"A device of this process holds rows {start}-{stop - 1}, which it does not feed.")
  return local[(at,) + tuple(index[1:])]


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


def activation_spec(shape, names) -> P | None:
  """The PartitionSpec the rules give an activation of `shape` with logical `names` (a mesh
  axis that does not divide its dimension is dropped); None outside `activation_sharding`."""
  rules = _ACTIVE_RULES.get()
  mesh = jax.sharding.get_abstract_mesh()
  if rules is None or mesh.empty:
    return None
  spec = []
  for dim, axes in zip(shape, logical_to_spec(names, rules, mesh)):
    spec.append(axes if dim % axes_size(mesh, axes) == 0 else None)
  return P(*spec)


def constrain(x, names):
  """with_sharding_constraint by logical names; a no-op outside `activation_sharding`.

  Without it, FSDP lets XLA keep the batch replicated and split activations along `embed`
  like the weights, which multiplies activation memory by the number of devices.
  """
  spec = activation_spec(x.shape, names)
  return x if spec is None else jax.lax.with_sharding_constraint(x, spec)
