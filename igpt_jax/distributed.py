"""Several processes, one program: start-up, who writes files, agreement, preemption.

Every stage runs on N processes (a TPU pod slice, a SLURM job, `launch/local.sh -n N`). Each
process calls `initialize` before JAX touches a device. Files other than checkpoints are written
by process 0 only (`is_chief`); numbers that every host must agree on go through `agree`/
`allgather`; preemption (`PREEMPTION`) uses JAX's sync point when there are several processes
(so that every host stops at the same step or batch) and signal handlers when there is one.
"""

from __future__ import annotations

import contextlib
import os
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


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped for a preemption after keeping its work; rerun it


class Preempted(Exception):
  """A stage stopped because the job is being stopped (a scheduler's SIGTERM, Ctrl-C), after
  keeping what it had finished: a training step's checkpoint, a probe's whole feature chunks, a
  prepared set's whole shards. The CLI exits with EXIT_PREEMPTED, `all` starts no later stage,
  and the same command continues where it stopped."""

  def __init__(self, result: dict):
    super().__init__(f"preempted in {result.get('stage')}"
                     + (f" at step {result['step']}" if "step" in result else ""))
    self.result = result


# Where JAX's preemption service (XLA's PreemptionSyncManager) posts the first notice any process
# receives: every process can read it without a collective.
_NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"


class Preemption:
  """Whether the job is being stopped, asked at the same points by every process.

  One process: SIGTERM and SIGINT (Ctrl-C) handlers set a flag. Several: JAX's preemption service
  catches SIGTERM on any process and tells the others; a Python SIGTERM handler would replace its
  handler, so SIGINT is handed to it as a SIGTERM -- by a thread woken through the signal
  module's wakeup fd, at once, even while the main thread waits in a barrier or a compile
  (where a Python handler would only run once it returns). Two ways to ask:
  - `should_stop()` / `check()`, collective: every process calls them at the same points in the
    same order (each training step, each batch of a pass over a split, each fit); they turn true
    at the same call everywhere (JAX's sync point over a counter of these calls), so every
    process stops at the same step or batch and saves the same state.
  - `requested()` / `raise_if_requested()`, no collective: for work one process does while the
    others wait (process 0's palette fit, a data set's preparation); see `on_chief`.
  A second Ctrl-C quits at once (KeyboardInterrupt), without saving.
  """

  def __init__(self):
    self.signal: str | None = None  # the signal this process's handler saw
    self.stopping = False  # a stop point was reached; stays so
    self._calls = 0
    self._previous: dict = {}
    self._handed_on = False  # a Ctrl-C was handed to JAX's notifier
    self._wakeup = None  # (socket pair, the wakeup fd before ours)

  def install(self) -> bool:
    """The handlers (see the class doc); False when they were installed already. Main thread
    only, after `initialize`."""
    if self._previous:
      return False
    wanted = [signal.SIGINT] + ([] if _several() else [signal.SIGTERM])
    self._previous = {s: signal.signal(s, self._on_signal) for s in wanted}
    if _several():
      self._watch_wakeup_fd()
    return True

  def uninstall(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}
    if self._wakeup is not None:
      (reader, writer), before = self._wakeup
      signal.set_wakeup_fd(before)
      writer.close()  # ends the watching thread
      self._wakeup = None

  def _watch_wakeup_fd(self) -> None:
    """A thread that hands a Ctrl-C to JAX's notifier as soon as it arrives: Python's C-level
    handler writes each signal's number to the wakeup fd, whatever the main thread is doing."""
    import socket
    import threading
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    before = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    self._wakeup = ((reader, writer), before)

    def watch():
      with reader:
        while data := reader.recv(64):  # b'' once `uninstall` closes the writer
          if signal.SIGINT in data:
            self._hand_on()

    threading.Thread(target=watch, daemon=True, name="preemption-signals").start()

  def _hand_on(self) -> None:
    if not self._handed_on:
      self._handed_on = True
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier tells every process

  @contextlib.contextmanager
  def installed(self):
    """The handlers for a block (a library caller's training loop, in a notebook), unless
    already there; after it, a stop it saw is forgotten (the notebook's next run starts)."""
    mine = self.install()
    try:
      yield self
    finally:
      if mine:
        self.uninstall()
        self.signal, self.stopping = None, False

  def _on_signal(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signal == "SIGINT":
      raise KeyboardInterrupt  # Ctrl-C twice: quit now, without saving
    self.signal = signal.Signals(signum).name
    if _several() and signum == signal.SIGINT:
      self._hand_on()  # unless the wakeup thread did already

  def requested(self) -> bool:
    """Whether a stop was asked for, here or on any process (no collective)."""
    if self.signal is not None or self.stopping:
      return True
    if not _several():
      return False
    try:
      return _client().key_value_try_get(_NOTICE_KEY) is not None
    except Exception:  # noqa: BLE001 - NOT_FOUND: no notice yet
      return False

  def should_stop(self) -> bool:
    """Collective (see the class doc): True from the same call on every process once a stop
    was asked for anywhere."""
    if not self.stopping:
      if not _several():
        self.stopping = self.signal is not None
      else:
        from jax.experimental import multihost_utils
        self._calls += 1
        self.stopping = bool(multihost_utils.reached_preemption_sync_point(self._calls))
    return self.stopping

  def check(self, stage: str, **result) -> None:
    """Collective: raises Preempted({'stage': stage, **result}) at the stop point."""
    if self.should_stop():
      raise Preempted({"stage": stage, **result})

  def raise_if_requested(self, stage: str, **result) -> None:
    """No collective: raises Preempted as soon as a stop was asked for anywhere."""
    if self.requested():
      self.stopping = True
      raise Preempted({"stage": stage, **result})

  def batches(self, items, stage: str):
    """`items` with a collective `check` before each: a pass over a split that every process
    makes in lockstep (evaluation, feature extraction) stops at the same batch everywhere."""
    for item in items:
      self.check(stage)
      yield item


PREEMPTION = Preemption()  # one per process: the signal handlers are the process's


def _several() -> bool:
  """Several processes joined by jax.distributed (asked without starting a backend when there
  is no cluster: `prepare` runs on a host whose accelerator may be another job's)."""
  return jax.distributed.is_initialized() and jax.process_count() > 1


def on_chief(name: str, work) -> None:
  """Runs `work()` on process 0 while the others wait at a barrier. A preemption of that work
  (it raises Preempted) stops every process: process 0 still reaches the barrier, then tells
  the others."""
  stopped = None
  if is_chief():
    try:
      work()
    except Preempted as e:
      stopped = e
  barrier(name)
  told = from_chief(f"{name}_preempted", "yes" if stopped else "")
  if stopped is not None:
    raise stopped
  if told:
    raise Preempted({"stage": name})
