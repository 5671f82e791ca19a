"""Orbax checkpoints: train state + metadata (resolved config, palette), atomic and async.

Layout: <workdir>/checkpoints/<stage>/<step>/{state, meta}. `restore_latest` takes the newest
step that reads back whole and names each step it had to skip. Restores go onto an abstract
target that carries shardings, so a checkpoint restores onto a different device count.
"""

from __future__ import annotations

import os
import time

import jax
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, meta: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore_latest(self, abstract_state, check_meta=None, log=print):
    """(step, state, meta) of the newest readable step, or None when there is none.

    `check_meta(meta)` runs before any array is read and may raise (a different model, say):
    that is the user's mistake to fix, not a damaged checkpoint to skip.
    """
    for step in reversed(self.all_steps()):
      try:
        meta = self.read_meta(step)
      except Exception as e:  # noqa: BLE001
        self._set_aside(step, e, log)
        continue
      if check_meta is not None:
        check_meta(meta)
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        jax.block_until_ready(restored["state"])
        return step, restored["state"], meta
      except Exception as e:  # noqa: BLE001 - any unreadable step is skipped, loudly
        self._set_aside(step, e, log)
    return None

  def _set_aside(self, step: int, error: Exception, log) -> None:
    """Moves an unreadable step out of the way, kept for inspection; it can be written again."""
    path = os.path.join(self.directory, str(step))
    aside = f"{path}.unreadable-{int(time.time())}"
    log(f"warning: checkpoint {path} is unreadable ({type(error).__name__}: "
        f"{str(error).splitlines()[0][:200]}); moved to {aside}, trying an older one.")
    if jax.process_index() == 0:
      os.rename(path, aside)
    self.manager.reload()

  def wait(self) -> None:
    """Blocks until async saves are on disk; raises if one failed."""
    self.manager.wait_until_finished()
    if hasattr(self.manager, "check_for_errors"):
      self.manager.check_for_errors()

  def close(self) -> None:
    self.wait()
    self.manager.close()
