"""Goodput: where a training run's wall time went, over every attempt (restart) of the run.

A pod is paid for by the hour, not by the step. Each process records its time as a timeline of
phases, one at a time -- start-up (from the moment the OS started the process: interpreter,
imports, config), distributed init, set-up (data, palette, model), restore, head probe, compile, steps,
evaluation, sample grid, checkpoint, after training -- appending one span per phase to
`<workdir>/goodput/process-<i>.jsonl` (appendlog: off the main thread). `summarize` reads
process 0's spans of every attempt and splits the attempts' wall time into productive step time
and badput by cause: the phases above, the host's input waits inside the step loop
(`data_loading`), and the steps an attempt trained after its last checkpoint, retrained by the
next attempt (`lost_progress`). Process 0 writes it as `<workdir>/goodput.json` when a training
stage ends and when the process exits.

Like MaxText's goodput (ml-goodput-measurement), offline: from files in the workdir, no service.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

from etils import epath

from igpt_jax import appendlog
from igpt_jax import workdir as workdir_lib

REPORT = "goodput.json"
# Phases, in the order a training attempt goes through them (badput keys, but `steps`).
PHASES = ("startup", "distributed_init", "setup", "restore", "head_probe", "compile", "steps", "logging",
          "evaluation", "sample_grid", "checkpoint", "after_training")


def process_start_time() -> float:
  """When the OS started this process (Unix time): interpreter start-up and imports count.
  Linux's /proc; elsewhere the time this module was imported."""
  try:
    with open("/proc/self/stat") as f:
      started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - started_ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - age
  except (OSError, ValueError, IndexError, AttributeError):
    return _IMPORTED


_IMPORTED = time.time()


def events_path(workdir, process: int) -> epath.Path:
  return workdir_lib.path(workdir) / "goodput" / f"process-{process}.jsonl"


def report_path(workdir) -> epath.Path:
  return workdir_lib.path(workdir) / REPORT


class Timeline:
  """This process's phases: `switch(phase)` ends the current phase's span and starts the next,
  so every second from the process's start belongs to exactly one phase. `count_step` adds a
  trained step (and the host's input wait) to the current `steps` span."""

  def __init__(self):
    self.workdir = self.attempt = self.process = self._log = self._writer = None
    self.phase, self.stage, self.t0, self.fields = None, None, None, {}
    self.first_step = self.last_step = None
    self.input_s = 0.0
    self._early: list[tuple[str, float, float]] = []

  def remember(self, phase: str, t0: float, t1: float) -> None:
    """A phase of the start-up, before any stage knows the workdir (jax.distributed's start)."""
    self._early.append((phase, t0, t1))

  def begin(self, workdir, stage: str) -> None:
    """A training stage starts: its set-up phase begins. The first stage of a process (in a
    workdir) first records the process's start-up."""
    import jax
    workdir = str(workdir_lib.path(workdir))
    if workdir != self.workdir:
      if self._log is not None:  # in-process, a run in another workdir: this one's last span
        self._write_span(time.time())
      self.close()
      started = process_start_time() if self.attempt is None else time.time()
      self.workdir = workdir
      self.attempt = f"{int(started * 1e6)}-{os.getpid()}"
      self.process = jax.process_index()
      self._log = appendlog.AppendLog(events_path(workdir, self.process))
      self._writer = appendlog.Background(str(self._log.path))
      self._writer.submit(appendlog.compact, self._log.path)
      self.stage, self.t0 = stage, started
      for phase, t0, t1 in self._early:  # the process's first stage: start-up, split by them
        self.phase = "startup"
        self._write_span(t0)
        self.phase, self.t0 = phase, t0
        self._write_span(t1)
        self.t0 = t1
      self.phase, self._early = "startup", []
    self.switch("setup", stage=stage)

  def switch(self, phase: str, stage: str | None = None, **fields) -> None:
    """Ends the current phase (writing its span) and starts `phase`; `fields` describe it (a
    restore's step)."""
    if self._log is None:
      return
    now = time.time()
    self._write_span(now)
    self.phase, self.t0, self.fields = phase, now, fields
    self.stage = stage or self.stage
    self.first_step = self.last_step = None
    self.input_s = 0.0

  def describe(self, **fields) -> None:
    """Adds to the current span's fields (a restore's step, known once it is done)."""
    self.fields.update(fields)

  def count_step(self, step: int, input_s: float) -> None:
    if self.first_step is None:
      self.first_step = step
    self.last_step, self.input_s = step, self.input_s + input_s

  @contextlib.contextmanager
  def during(self, phase: str):
    """`phase` inside the step loop, then the steps again."""
    self.switch(phase)
    try:
      yield
    finally:
      self.switch("steps")

  def note(self, kind: str, **fields) -> None:
    """A moment rather than a phase: a preemption's stop, the process's exit."""
    if self._log is not None:
      self._submit({"attempt": self.attempt, "note": kind, "stage": self.stage,
                    "t": time.time(), **fields})

  def flush(self) -> None:
    """Remote: the spans so far to storage now (at each checkpoint, like the metrics)."""
    if self._log is not None:
      self._writer.submit(self._log.flush)

  def _write_span(self, now: float) -> None:
    span = {"attempt": self.attempt, "phase": self.phase, "stage": self.stage, "t0": self.t0,
            "t1": now, **self.fields}
    if self.phase == "steps":
      if self.first_step is None:  # between two duties of one step: log lines, host times
        span["phase"] = "logging"
      else:
        span.update(first_step=self.first_step, last_step=self.last_step,
                    input_s=self.input_s)
    self._submit(span)

  def _submit(self, event: dict) -> None:
    self._writer.submit(self._log.append, json.dumps(event) + "\n")

  def report(self) -> dict | None:
    """Writes goodput.json from process 0's events (this attempt's up to now): the spans are
    flushed first. Returns the summary (process 0) or None."""
    if self._log is None:
      return None
    self.switch(self.phase, **self.fields)  # the current phase so far, written
    self._writer.submit(self._log.flush)
    self._writer.wait()
    if self.process != 0:
      return None
    summary = summarize(read_events(self.workdir, 0))
    workdir_lib.write_atomic(report_path(self.workdir), json.dumps(summary, indent=2).encode())
    return summary

  def finish(self) -> None:
    """The process exits: its last span and an exit note, then goodput.json."""
    if self._log is None:
      return
    self.note("exit")
    try:
      self.report()
    finally:
      self.close()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.submit(self._log.close)
      self._writer.close()
    self._log = self._writer = None


TIMELINE = Timeline()


def read_events(workdir, process: int = 0) -> list[dict]:
  return [json.loads(line) for line in appendlog.read_lines(events_path(workdir, process))]


def summarize(events: list[dict]) -> dict:
  """Wall time, productive step time and badput by cause over every attempt; steps lost to
  each disruption; time to the first step of each attempt."""
  attempts: dict[str, list[dict]] = {}
  for event in events:
    attempts.setdefault(event["attempt"], []).append(event)
  ordered = sorted(attempts.values(), key=lambda a: min(_t0(e) for e in a))
  badput = {phase: 0.0 for phase in PHASES if phase != "steps"}
  badput.update(data_loading=0.0, lost_progress=0.0, unaccounted=0.0)
  productive = wall = 0.0
  rows = []
  for events_of in ordered:
    spans = [e for e in events_of if "phase" in e]
    start, end = min(_t0(e) for e in events_of), max(_t1(e) for e in events_of)
    wall += end - start
    for span in spans:
      seconds = span["t1"] - span["t0"]
      if span["phase"] == "steps":
        badput["data_loading"] += span["input_s"]
        productive += seconds - span["input_s"]
      else:
        badput[span["phase"]] = badput.get(span["phase"], 0.0) + seconds
    badput["unaccounted"] += (end - start) - sum(s["t1"] - s["t0"] for s in spans)
    steps = [s for s in spans if s["phase"] == "steps"]
    notes = {e["note"] for e in events_of if "note" in e}
    rows.append({
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)),
        "wall_s": end - start,
        "to_first_step_s": (min(s["t0"] for s in steps) - start) if steps else None,
        "steps": [min(s["first_step"] for s in steps), max(s["last_step"] for s in steps)]
                 if steps else None,
        "ended": ("preempted" if "preempted" in notes else "exited" if "exit" in notes
                  else "killed (no exit recorded)"),
        "_steps": steps, "_spans": spans})
  disruptions = []
  for before, after in zip(rows, rows[1:]):
    for stage in sorted({s["stage"] for s in before["_steps"]}):
      resumed = next((s.get("restored_step") for s in after["_spans"]
                      if s["phase"] == "restore" and s["stage"] == stage), None)
      if resumed is None:
        continue  # the next attempt did not train this stage
      trained = max(s["last_step"] for s in before["_steps"] if s["stage"] == stage)
      lost_s = sum(_lost_seconds(s, resumed) for s in before["_steps"] if s["stage"] == stage)
      productive -= lost_s
      badput["lost_progress"] += lost_s
      disruptions.append({"stage": stage, "ended": before["ended"], "trained_to_step": trained,
                          "resumed_from_step": resumed, "lost_steps": max(trained - resumed, 0),
                          "lost_s": lost_s})
  for row in rows:
    del row["_steps"], row["_spans"]
  return {"wall_s": wall, "productive_s": productive,
          "goodput": productive / wall if wall > 0 else None,
          "badput_s": badput, "attempts": len(rows),
          "lost_steps": [d["lost_steps"] for d in disruptions],
          "disruptions": disruptions, "by_attempt": rows}


def _lost_seconds(span: dict, resumed: int) -> float:
  """The productive seconds of a steps span spent on steps after `resumed` (retrained later),
  pro rata by steps."""
  first, last = span["first_step"], span["last_step"]
  lost = max(0, last - max(first - 1, resumed))
  return (span["t1"] - span["t0"] - span["input_s"]) * lost / (last - first + 1)


def _t0(event: dict) -> float:
  return event.get("t0", event.get("t"))


def _t1(event: dict) -> float:
  return event.get("t1", event.get("t"))


def text(summary: dict) -> str:
  """One log line: goodput and the three largest causes of badput."""
  top = sorted(summary["badput_s"].items(), key=lambda kv: -kv[1])[:3]
  return (f"goodput {summary['goodput']:.1%} of {summary['wall_s']:.0f} s over "
          f"{summary['attempts']} attempt(s); badput: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in top if v > 0)
          + f"; lost steps {summary['lost_steps']}")


def main(argv: list[str]) -> int:
  """`python -m igpt_jax.goodput WORKDIR`: the summary from the events as they are now -- a
  run in progress, or one whose last attempt was killed before it could write goodput.json."""
  if len(argv) != 1 or argv[0].startswith("-"):
    print("usage: python -m igpt_jax.goodput WORKDIR", file=sys.stderr)
    return 2
  events = read_events(argv[0])
  if not events:
    print(f"error: no goodput events in {events_path(argv[0], 0)}: has a training stage run "
          "in this workdir?", file=sys.stderr)
    return 2
  summary = summarize(events)
  print(text(summary), file=sys.stderr)
  print(json.dumps(summary, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
