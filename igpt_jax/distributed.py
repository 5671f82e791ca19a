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

from igpt_jax.config import RunFailed, UserError

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


# A barrier a process has not reached after this long stops every process with an error that
# names the ones missing (a hung live host, which heartbeats cannot catch). Long enough for
# process 0's own work behind a barrier (fitting a palette).
BARRIER_TIMEOUT_S = 3600


class PeerError(RunFailed):
  """Another process did not arrive or does not agree: this run cannot go on."""


_uses: dict[str, int] = {}


def _unique_key(kind: str, name: str) -> str:
  """A fresh coordination-service key per use; every process calls these in the same order,
  so the n-th use of a name is the same key everywhere."""
  base = f"igpt_jax/{kind}/{name}"
  _uses[base] = _uses.get(base, 0) + 1
  return f"{base}/{_uses[base]}"


def _client():
  from jax._src import distributed as jax_distributed
  return jax_distributed.global_state.client


def barrier(name: str, timeout_s: float | None = None) -> None:
  """All processes wait here for each other (no-op with one process). After `timeout_s`
  (default BARRIER_TIMEOUT_S) every waiting process raises PeerError naming the processes
  that never arrived."""
  if jax.process_count() == 1:
    return
  timeout_s = BARRIER_TIMEOUT_S if timeout_s is None else timeout_s
  key = _unique_key("barrier", name)
  client = _client()
  client.key_value_set(f"{key}/{jax.process_index()}", "arrived")
  try:
    client.wait_at_barrier(key, int(timeout_s * 1000))
  except Exception as e:  # noqa: BLE001 - the coordination service's DEADLINE_EXCEEDED
    arrived = {int(k.rsplit("/", 1)[-1]) for k, _ in client.key_value_dir_get(f"{key}/")}
    missing = sorted(set(range(jax.process_count())) - arrived)
    raise PeerError(f"Process {jax.process_index()}: process(es) {missing} did not reach the "
                    f"{name!r} barrier within {timeout_s:.0f} s ({type(e).__name__}); stopping "
                    "rather than waiting forever. Their logs say why.") from e


def from_chief(name: str, value: str, timeout_s: float | None = None) -> str:
  """Process 0's `value` on every process (e.g. the default workdir, which has a timestamp)."""
  if jax.process_count() == 1:
    return value
  key = _unique_key("from_chief", name)
  if is_chief():
    _client().key_value_set(key, value)
    return value
  return _client().blocking_key_value_get(key, int((timeout_s or BARRIER_TIMEOUT_S) * 1000))


def agree(name: str, value: str, what: str) -> None:
  """Every process must hold the same `value` (a description of what it sees); else every
  process raises UserError naming those that differ from process 0, and what they see."""
  if jax.process_count() == 1:
    return
  key = _unique_key("agree", name)
  client = _client()
  client.key_value_set(f"{key}/{jax.process_index()}", value)
  barrier(f"agree_{name}")
  seen = {int(k.rsplit("/", 1)[-1]): v for k, v in client.key_value_dir_get(f"{key}/")}
  differ = sorted(i for i, v in seen.items() if v != seen[0])
  if differ:
    raise UserError(f"Processes disagree on {what}: process 0 sees {seen[0]!r} but "
                    + "; ".join(f"process {i} sees {seen[i]!r}" for i in differ[:4])
                    + ". Every process must see the same shared storage (a shared file system "
                    "or gs://) and the same arguments.")


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


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved after a preemption signal; the same command resumes


class Preempted(Exception):
  """A training stage saved after a preemption signal and stopped before its last step. The
  CLI exits with EXIT_PREEMPTED and `all` starts no later stage."""

  def __init__(self, result: dict):
    super().__init__(f"preempted at step {result.get('step')}")
    self.result = result


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
