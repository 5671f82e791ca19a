"""Several processes, one program: start-up, who writes files, agreement, preemption.

Every stage runs on N processes (a TPU pod slice, a SLURM job, `launch/local.sh -n N`). Each
process calls `initialize` before JAX touches a device. Files other than checkpoints are written
by process 0 only (`is_chief`); numbers that every host must agree on go through `agree`/
`allgather`; preemption uses JAX's sync point when there are several processes (so that every
host saves the same step) and a SIGTERM handler when there is one.
"""

from __future__ import annotations

import signal

import jax
import numpy as np

from igpt_jax.config import UserError

# A host that stops sending heartbeats is declared dead after this long; the others then stop
# with an error instead of waiting for it forever.
HEARTBEAT_TIMEOUT_S = 60


def initialize(coordinator_address: str | None = None, process_count: int | None = None,
               process_index: int | None = None,
               heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S) -> None:
  """jax.distributed.initialize, explicitly (all three given) or by JAX's own cluster detection.

  Without arguments JAX looks for a TPU VM, GKE, SLURM or Open MPI environment; where it finds
  none this is a single-process run and nothing is started.
  """
  if jax.distributed.is_initialized():
    return
  given = [v is not None for v in (coordinator_address, process_count, process_index)]
  if any(given) and not all(given):
    raise UserError("--coordinator_address, --process_count and --process_index go together: "
                    "give all three (or none, to let JAX detect the cluster).")
  # CPU collectives between processes (ignored by GPU and TPU backends).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if all(given):
    if process_count < 1 or not 0 <= process_index < process_count:
      raise UserError(f"--process_index={process_index} must be in [0, --process_count="
                      f"{process_count}).")
    if process_count == 1:
      return
    jax.distributed.initialize(coordinator_address, process_count, process_index,
                               heartbeat_timeout_seconds=heartbeat_timeout_s)
    return
  try:
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s)
  except ValueError as e:
    if "coordinator_address" not in str(e):  # a cluster was found but is misconfigured
      raise
    # No cluster environment: one process.


def is_chief() -> bool:
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """All processes wait here for each other (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def allgather(values) -> np.ndarray:
  """[process_count, ...]: one row per process of a host-side numpy value."""
  values = np.asarray(values)
  if jax.process_count() == 1:
    return values[None]
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(values))


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is true on any: for decisions that start collective
  work (a file one process sees and another does not yet must not split them)."""
  return bool(allgather(np.int32(bool(flag))).max())


def to_host(array) -> np.ndarray:
  """A global jax.Array, whole, as numpy on every process (never np.asarray on a global array
  that this process only holds part of)."""
  if getattr(array, "is_fully_addressable", True) or array.is_fully_replicated:
    return np.asarray(array)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


class PreemptionWatch:
  """Tells the training loop when to save and stop because the job is being preempted.

  One process: a SIGTERM handler sets a flag (restored on exit). Several: JAX's preemption sync
  point, which catches SIGTERM itself and agrees with every host on the step to save at; a
  Python handler here would replace its handler, and each host would stop at a different step.
  """

  def __init__(self):
    self.signalled = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _on_sigterm(self, signum, frame):
    self.signalled = True

  def should_stop(self, step: int) -> bool:
    """Call once per step on every process."""
    if jax.process_count() == 1:
      return self.signalled
    from jax.experimental import multihost_utils
    return multihost_utils.reached_preemption_sync_point(step)
