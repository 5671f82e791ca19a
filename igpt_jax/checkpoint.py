"""Orbax checkpoints: parameters, the rest of the train state and metadata, atomic and async.

Layout: <workdir>/checkpoints/<stage>/<step>/{params, train, meta}. `params` is its own item so
the stages downstream of training (probe, sample, fine-tuning's start) read only it, not the
Adam moments. Restores go onto an abstract target that carries shardings, so a checkpoint
restores onto a different device count.

A restore tells three failures apart, because they need opposite responses:
- a damaged step (truncated, corrupt, half-deleted files) is moved aside with a warning and the
  next older step is tried -- only when every one of several reads (with backoff) fails on its
  contents: an object store's transient error must not roll training back to an older step;
- a step that does not match the config (model shape, palette, optimizer-state tree) stops the
  run with one sentence and touches nothing: the user changed a setting, and the checkpoint is
  still good for the old one;
- anything else (out of memory, a storage or network error) stops the run and touches nothing.
Every process takes part and all of them agree on the step they restore.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from igpt_jax import distributed
from igpt_jax.config import RunFailed, UserError

# Words in the errors Orbax / TensorStore / json raise for files that are cut short, corrupt or
# missing inside a step that Orbax had committed.
_DAMAGE_MARKERS = ("DATA_LOSS", "corrupt", "truncat", "unexpected end", "unexpected eof",
                   "expecting value", "failed to decode", "error decoding", "not_found",
                   "no such file", "checksum", "out_of_range", "unterminated string")
_OK, _DAMAGED, _MISMATCH, _FAILED = 0, 1, 2, 3


class CheckpointMismatch(UserError):
  """The checkpoint is intact but was written for another config."""


class RestoreFailed(RunFailed):
  """Reading a checkpoint failed for a reason that does not mean it is damaged."""


def storage_problem(step_dir) -> str | None:
  """What the storage says when asked for a step's files: None when it serves every one (so a
  restore error means their bytes are bad: damage), else why not (missing here, permissions, a
  network error: not damage, and nothing may be moved). One byte of each file is read."""
  from etils import epath
  step_dir = epath.Path(step_dir)
  def walk(d):
    for p in d.iterdir():
      yield from (walk(p) if p.is_dir() else (p,))

  try:
    files = list(walk(step_dir)) if step_dir.is_dir() else []
    if not files:
      return f"{step_dir} is missing or empty on this host"
    for f in files:
      with f.open("rb") as handle:
        handle.read(1)
  except OSError as e:
    return f"{type(e).__name__}: {e}"
  return None


def is_damage(error: BaseException) -> bool:
  if isinstance(error, (json.JSONDecodeError, FileNotFoundError, EOFError)):
    return True
  text = f"{type(error).__name__}: {error}".lower()
  return any(marker.lower() in text for marker in _DAMAGE_MARKERS)


def _paths_and_shapes(tree) -> dict:
  """{'a/b/c': shape} for an abstract pytree or Orbax's tree metadata."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = "/".join(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path)
    out[key] = tuple(getattr(leaf, "shape", ()) or ())
  return out


def tree_difference(saved, wanted) -> str:
  """'' when the two trees have the same paths and shapes, else a short description."""
  a, b = _paths_and_shapes(saved), _paths_and_shapes(wanted)
  only_saved, only_wanted = sorted(set(a) - set(b)), sorted(set(b) - set(a))
  shapes = sorted(k for k in set(a) & set(b) if a[k] != b[k])
  parts = []
  if only_saved:
    parts.append(f"only in the checkpoint: {', '.join(only_saved[:3])}")
  if only_wanted:
    parts.append(f"only in the config: {', '.join(only_wanted[:3])}")
  if shapes:
    parts.append(", ".join(f"{k} saved {a[k]} vs configured {b[k]}" for k in shapes[:3]))
  return "; ".join(parts)


def fingerprint(params) -> str:
  """A digest of a parameter tree's values, computed where they live (a sharded model is never
  copied to one host): which weights a cache was built from, whatever step or file they came
  from. Two wrapping sums of each leaf's float32 bits, one weighted by position."""
  import hashlib
  sums = distributed.to_host(_fingerprint_sums(jax.tree.leaves(params)))
  return hashlib.sha256(np.ascontiguousarray(sums).tobytes()).hexdigest()[:16]


@jax.jit
def _fingerprint_sums(leaves):
  import jax.numpy as jnp
  out = []
  for x in leaves:
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    weight = jnp.ones(bits.shape, jnp.uint32)
    for d in range(bits.ndim):  # an odd multiplier per axis: 1 + sum_d index_d * m_d
      m = (0x9E3779B1 * (d + 1)) % 2**32 | 1
      weight = weight + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d) * jnp.uint32(m)
    out += [jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weight, dtype=jnp.uint32)]
  return jnp.stack(out)


def _without_params(state: dict) -> dict:
  """The `train` item: everything in the train state but the parameters."""
  return {k: v for k, v in state.items() if k != "params"}


class Checkpointer:
  """`read_attempts` reads of a step, `retry_wait_s` x 4^i apart, before it counts as damaged
  or unreadable."""

  def __init__(self, directory, keep: int = 3, async_save: bool = True, read_attempts: int = 3,
               retry_wait_s: float = 1.0):
    self.directory = epath.Path(directory)
    self.read_attempts, self.retry_wait_s = max(1, read_attempts), retry_wait_s
    self.manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={"params": ocp.StandardCheckpointHandler(),
                       "train": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: dict, meta: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]),
        train=ocp.args.StandardSave(_without_params(state)),
        meta=ocp.args.JsonSave(meta)), force=True)

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore_latest(self, abstract_state, check_meta=None, config: dict | None = None,
                     log=print, steps: list[int] | None = None):
    """(step, state, meta) of the newest intact step (of `steps`, when given), or None when
    there is none.

    `abstract_state` is {'params': ...} alone (hand-off: parameters only) or the whole train
    state. `check_meta(meta)` runs first and raises CheckpointMismatch for another config;
    `config` (the run's config as a dict) lets a mismatch name the setting that changed.
    """
    for step in reversed([s for s in self.all_steps() if steps is None or s in steps]):
      status, result, error = self._read_with_retries(step, abstract_state, check_meta, config,
                                                      log)
      statuses = distributed.allgather(np.int32(status))
      worst = int(statuses.max())
      if worst == _OK:
        return step, result[0], result[1]
      if worst == _DAMAGED:
        self._set_aside(step, error, log)
        continue
      where = self.directory / str(step)
      if status == worst and error is not None:
        if worst == _MISMATCH:
          raise error
        raise RestoreFailed(f"Could not read checkpoint {where} ({type(error).__name__}: "
                            f"{str(error).splitlines()[0][:300]}); nothing was changed. Fix "
                            "the cause and rerun to resume from it.") from error
      raise RestoreFailed(f"Another process could not read checkpoint {where}; nothing was "
                          "changed (see its error).")
    return None

  def _read_with_retries(self, step: int, abstract_state: dict, check_meta, config, log):
    """`_try_restore` until it reads the step or refuses it (a mismatch), at most
    `read_attempts` times: a step is damaged only when every read says so."""
    for attempt in range(self.read_attempts):
      if attempt:
        wait = self.retry_wait_s * 4 ** (attempt - 1)
        log(f"warning: reading checkpoint {self.directory / str(step)} failed "
            f"({type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''});"
            f" reading it again in {wait:g} s ({attempt + 1}/{self.read_attempts}).")
        time.sleep(wait)
      status, result, error = self._try_restore(step, abstract_state, check_meta, config)
      if status in (_OK, _MISMATCH):
        break
    return status, result, error

  def _try_restore(self, step: int, abstract_state: dict, check_meta, config):
    """(status, (state, meta) or None, error or None) of this process's attempt at `step`."""
    try:
      meta = self.read_meta(step)
      saved = self.manager.item_metadata(step)
    except Exception as e:  # noqa: BLE001 - sorted below
      return self._sort_error(step, e)
    try:
      if check_meta is not None:
        check_meta(meta)
      self._check_trees(step, saved, abstract_state, meta.get("config", {}), config or {})
    except CheckpointMismatch as e:
      return _MISMATCH, None, e
    items = {"params": ocp.args.StandardRestore(abstract_state["params"])}
    rest = _without_params(abstract_state)
    if rest:
      items["train"] = ocp.args.StandardRestore(rest)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
      state = {"params": restored["params"], **(restored["train"] if rest else {})}
      jax.block_until_ready(state)
      return _OK, (state, meta), None
    except Exception as e:  # noqa: BLE001 - sorted by the caller
      return self._sort_error(step, e)

  def _sort_error(self, step: int, error: BaseException):
    """Damaged (set aside, an older step tried) only if the storage serves every file of the
    step and the error is about their contents; anything the storage refuses stops the run."""
    problem = storage_problem(self.directory / str(step))
    if problem is not None:
      return _FAILED, None, RestoreFailed(f"the storage does not serve checkpoint step {step} "
                                          f"here ({problem})")
    return (_DAMAGED if is_damage(error) else _FAILED), None, error

  def _check_trees(self, step: int, saved, abstract_state: dict, saved_config: dict,
                   config: dict) -> None:
    where = self.directory / str(step)
    for item, wanted in (("params", abstract_state["params"]),
                         ("train", _without_params(abstract_state))):
      if item == "train" and not wanted:
        continue
      if saved.get(item) is None:
        raise CheckpointMismatch(f"The checkpoint {where} has no {item!r} item: it was written "
                                 "by another version of igpt_jax. Use a new --workdir.")
      tree = getattr(saved[item], "tree", saved[item])
      diff = tree_difference(tree, wanted)
      if diff:
        what = "model parameters" if item == "params" else "optimizer state"
        raise CheckpointMismatch(
            f"The checkpoint {where} holds a different {what} than the config makes "
            f"({_config_difference(saved_config, config) or diff}): set it back to resume this run, or use a new "
            "--workdir to start another.")

  def _set_aside(self, step: int, error, log) -> None:
    """Moves a damaged step out of the way, kept for inspection; it can be written again."""
    path = self.directory / str(step)
    aside = self.directory / f"{step}.unreadable-{int(time.time())}"
    reason = (f"{type(error).__name__}: {str(error).splitlines()[0][:200]}" if error is not None
              else "damaged on another process")
    log(f"warning: checkpoint {path} is unreadable ({reason}); moved to {aside}, trying an "
        "older one.")
    if distributed.is_chief():
      path.rename(aside)
    distributed.barrier(f"set_aside_{step}")
    self.manager.reload()

  def wait(self) -> None:
    """Blocks until async saves are on disk; raises if one failed."""
    self.manager.wait_until_finished()
    if hasattr(self.manager, "check_for_errors"):
      self.manager.check_for_errors()

  def close(self) -> None:
    self.wait()
    self.manager.close()


# Settings whose change alters the optimizer-state tree: named in the mismatch message.
_STATE_SHAPING = ("train.grad_clip", "train.weight_decay", "train.accum_steps", "train.b1",
                  "train.b2")


def _config_difference(saved: dict, now: dict) -> str:
  diffs = []
  for key in _STATE_SHAPING:
    section, name = key.split(".")
    a, b = saved.get(section, {}).get(name), now.get(section, {}).get(name)
    if a is not None and b is not None and a != b:
      diffs.append(f"{key} saved {a} vs configured {b}")
  return ", ".join(diffs)
