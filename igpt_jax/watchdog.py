"""A step watchdog: when a step takes `factor` times the median step time, every thread's stack
goes to stderr (faulthandler), so a hung host says where it hangs -- in a collective, the input
pipeline, a checkpoint write -- instead of going silent.

It watches the device, not the host: the loop calls `beat(step)` when that step's result is
ready (it waits for step s while step s + 1 is already queued), so the intervals are the real
step times and a stall names the step the device is stuck on. The host running ahead of the
device would otherwise feed it at dispatch, every interval ~0 but the log steps'. The loop
pauses it around work that is slow by design (evaluation, sample grids).
"""

from __future__ import annotations

import contextlib
import faulthandler
import statistics
import sys
import threading
import time


class Watchdog:

  def __init__(self, factor: float, log=print, min_seconds: float = 60.0, poll: float = 1.0,
               stream=None, warmup_steps: int = 3):
    self.factor, self.log, self.min_seconds, self.poll = factor, log, min_seconds, poll
    self.stream = stream or sys.stderr
    self.warmup_steps = warmup_steps
    self.intervals: list[float] = []
    self.last = time.monotonic()
    self.step = None
    self.fired_at = None
    self.paused_depth = 0
    self._stop = threading.Event()
    self._thread = None

  def __enter__(self):
    if self.factor > 0:
      self._thread = threading.Thread(target=self._watch, daemon=True, name="step-watchdog")
      self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)

  def beat(self, step: int) -> None:
    """Step `step` has finished on the device."""
    now = time.monotonic()
    if self.step is not None and not self.paused_depth:
      self.intervals = (self.intervals + [now - self.last])[-100:]
    self.last, self.step = now, step

  @contextlib.contextmanager
  def paused(self):
    self.paused_depth += 1
    try:
      yield
    finally:
      self.paused_depth -= 1
      self.last = time.monotonic()

  def median(self) -> float | None:
    """The median of the last 100 step times (seconds), None before the first two beats."""
    return statistics.median(self.intervals) if self.intervals else None

  def limit(self) -> float | None:
    if len(self.intervals) < self.warmup_steps:
      return None
    return max(self.factor * statistics.median(self.intervals), self.min_seconds)

  def _watch(self) -> None:
    while not self._stop.wait(self.poll):
      limit = self.limit()
      waited = time.monotonic() - self.last
      if self.paused_depth or limit is None or waited < limit or self.fired_at == self.step:
        continue
      self.fired_at = self.step
      self.log(f"watchdog: no step finished for {waited:.0f} s after step {self.step}: the "
               f"device is stuck on step {self.step + 1} (median {self.median():.2f} s/step); "
               "stacks of every thread follow on stderr.")
      self.stream.flush()
      faulthandler.dump_traceback(file=self.stream, all_threads=True)
      self.stream.flush()
