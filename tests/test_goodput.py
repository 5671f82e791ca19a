"""Goodput: every second of a run's attempts accounted for -- productive steps, badput by cause,
steps lost to each disruption -- from the events each process writes to the workdir."""
import json
import re
import signal
import subprocess
import sys
import time

import pytest

from igpt_jax import goodput
from test_train import needs_fmnist, read_metrics, start_training, wait_for_step


def span(attempt, phase, t0, t1, **fields):
  return {"attempt": attempt, "phase": phase, "stage": "pretrain", "t0": t0, "t1": t1, **fields}


def test_steps_trained_after_the_last_checkpoint_are_charged_to_the_disruption():
  """Attempt a trains steps 1-100 and is killed after its step-60 checkpoint; attempt b resumes
  from 60: 40 steps' time (pro rata) moves from productive to lost_progress."""
  a = [span("a", "startup", 0, 2), span("a", "restore", 2, 3, restored_step=0),
       span("a", "compile", 3, 5),
       span("a", "steps", 5, 15, first_step=1, last_step=100, input_s=2.0),
       span("a", "checkpoint", 15, 16)]  # then killed: no exit note
  b = [span("b", "startup", 100, 101), span("b", "restore", 101, 102, restored_step=60),
       span("b", "steps", 103, 107, first_step=61, last_step=100, input_s=0.0),
       {"attempt": "b", "note": "exit", "stage": "pretrain", "t": 108}]
  report = goodput.summarize(b + a)  # any order
  assert report["attempts"] == 2 and report["wall_s"] == pytest.approx(16 + 8)
  lost = (10 - 2) * 40 / 100
  assert report["lost_steps"] == [40]
  assert report["disruptions"][0] == {
      "stage": "pretrain", "ended": "killed (no exit recorded)", "trained_to_step": 100,
      "resumed_from_step": 60, "lost_steps": 40, "lost_s": pytest.approx(lost)}
  badput = report["badput_s"]
  assert badput["lost_progress"] == pytest.approx(lost)
  assert badput["data_loading"] == pytest.approx(2)
  assert badput["startup"] == pytest.approx(3) and badput["compile"] == pytest.approx(2)
  assert badput["unaccounted"] == pytest.approx(1 + 1)  # b's 102-103 and 107-108: no span
  assert report["productive_s"] == pytest.approx(8 - lost + 4)
  assert report["productive_s"] + sum(badput.values()) == pytest.approx(report["wall_s"])
  assert [r["to_first_step_s"] for r in report["by_attempt"]] == [5, 3]
  assert [r["steps"] for r in report["by_attempt"]] == [[1, 100], [61, 100]]


@needs_fmnist
def test_a_run_preempted_twice_accounts_for_the_wall_clock_of_all_three_attempts(tmp_path):
  """SIGTERM, resume, SIGTERM, resume to the end, one process: goodput.json covers the three
  attempts -- their wall clock as the test measured it, split without a gap into productive
  time and badput, and the steps each disruption lost (the retrained ones: none after a save)."""
  workdir, walls, outs, trained = str(tmp_path), [], [], []
  for attempt in range(3):
    began = time.time()
    proc = start_training(workdir, steps=150, every=1000)
    if attempt < 2:
      wait_for_step(workdir, (trained[-1] if trained else 0) + 3, proc)
      proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    walls.append(time.time() - began)
    outs.append(out)
    assert proc.returncode == (75 if attempt < 2 else 0), out[-3000:]
    trained.append(read_metrics(workdir)[-1]["step"])
  resumed = [int(re.search(r"Resumed from checkpoint step (\d+)", o).group(1)) for o in outs[1:]]

  report = json.loads((tmp_path / "goodput.json").read_text())
  assert report["attempts"] == 3
  assert report["wall_s"] == pytest.approx(sum(walls), rel=0.05), (report["wall_s"], walls)
  assert report["productive_s"] + sum(report["badput_s"].values()) == pytest.approx(
      report["wall_s"], rel=0.05)
  assert report["badput_s"]["unaccounted"] < 0.01 * report["wall_s"]
  assert report["lost_steps"] == [t - r for t, r in zip(trained, resumed)] == [0, 0]
  assert 0 < report["goodput"] <= 1
  rows = report["by_attempt"]
  assert [r["ended"] for r in rows] == ["preempted", "preempted", "exited"]
  assert [r["steps"] for r in rows] == [[1, trained[0]], [trained[0] + 1, trained[1]],
                                        [trained[1] + 1, 150]]
  for row, wall in zip(rows, walls):
    assert 0 < row["to_first_step_s"] < row["wall_s"] == pytest.approx(wall, rel=0.05)
  assert "pretrain: goodput " in outs[-1]
  # The same summary on demand, from the events (a run in progress, or killed).
  shown = subprocess.run([sys.executable, "-m", "igpt_jax.goodput", workdir], capture_output=True,
                         text=True, check=True)
  assert json.loads(shown.stdout) == report and "goodput " in shown.stderr
  missing = subprocess.run([sys.executable, "-m", "igpt_jax.goodput", str(tmp_path / "none")],
                           capture_output=True, text=True)
  assert missing.returncode == 2 and missing.stderr.startswith("error: no goodput events in")
