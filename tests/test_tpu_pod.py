"""launch/tpu_pod.sh against a fake gcloud on PATH (tests/fake_gcloud): it records every call,
keeps the slice's state, runs each worker's commands in a home of its own and a fake job that
exits as the test's plan says. What only a real pod shows: gcloud's own output and timings, TPU
VM images, Python 3.11 from apt, jax[tpu] from PyPI on the workers."""
import os
import subprocess
import time

import pytest

from conftest import REPO

FAKE = os.path.join(REPO, "tests", "fake_gcloud")
SLICE = ["--name", "igpt-l", "--zone", "us-central2-b"]
JOB = ["--config", "configs/igpt_l.py", "--workdir", "gs://b/runs/l"]


@pytest.fixture
def pod(tmp_path):
  def call(*args, plan="", workers=2, timeout=120, job_seconds=0.5, env=None):
    (tmp_path / "plan").write_text(plan)
    env = {**{k: v for k, v in os.environ.items() if k != "LIBTPU_INIT_ARGS"}, "PATH": f"{FAKE}:{os.environ['PATH']}", "FAKE_GCLOUD_DIR": str(tmp_path),
           "FAKE_WORKERS": str(workers), "IGPT_POLL_SECONDS": "0.3", "FAKE_JOB_SECONDS": str(job_seconds),
           **(env or {})}
    proc = subprocess.run(["bash", f"{REPO}/launch/tpu_pod.sh", *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=REPO)
    return proc.returncode, proc.stdout + proc.stderr
  call.dir = tmp_path
  call.calls = lambda: (tmp_path / "calls.log").read_text().splitlines()
  call.state = lambda: (tmp_path / "state").read_text().strip()
  return call


def creates(calls):
  return [c for c in calls if " create " in f" {c} "]


def test_create_reuses_a_slice_and_makes_a_preempted_one_again(pod):
  code, out = pod("create", *SLICE, "--type", "v5litepod-64", "--spot")
  assert code == 0, out
  [create] = creates(pod.calls())
  assert "--accelerator-type=v5litepod-64" in create and "--version=v2-alpha-tpuv5-lite" in create
  assert "--spot" in create
  assert "installed on worker0" in out and "installed on worker1" in out
  code, out = pod("create", *SLICE, "--type", "v5litepod-64")  # the README's "same command"
  assert code == 0, out
  assert "reusing it" in out and len(creates(pod.calls())) == 1
  (pod.dir / "state").write_text("PREEMPTED\n")
  code, out = pod("create", *SLICE, "--type", "v5litepod-64")
  assert code == 0, out
  assert any("tpu-vm delete igpt-l" in c for c in pod.calls()) and len(creates(pod.calls())) == 2
  code, out = pod("create", *SLICE, "--type", "v5p-128", "--queued")
  assert code == 0  # READY now: reused, whatever the flags
  assert pod("create", *SLICE, "--type", "v9-8")[0] == 2  # no default version: a user error


def test_supervised_run_restarts_after_exit_75_until_done(pod):
  assert pod("create", *SLICE, "--type", "v4-32")[0] == 0
  code, out = pod("run", *SLICE, *JOB, "--supervise", "--", "--config.train.steps=10",
                  plan="75 75\n0 0\n")
  assert code == 0, out
  assert "exit 75" in out and "done: every worker exited 0 (1 restarts)" in out
  starts = [c for c in pod.calls() if "setsid nohup" in c]
  assert len(starts) == 2 and "--config.train.steps=10" in starts[0]
  for w in (0, 1):
    log = (pod.dir / f"worker{w}" / "igpt_run" / "train.log").read_text()
    assert log.count("[tpu_pod] start") == 2 and "step 10/10 done" in log


def test_supervised_run_remakes_a_preempted_slice_and_resumes(pod):
  assert pod("create", *SLICE, "--type", "v5litepod-16", "--spot")[0] == 0
  code, out = pod("run", *SLICE, *JOB, "--type", "v5litepod-16", "--spot", "--supervise",
                  plan="P P\n0 0\n")
  assert code == 0, out
  assert "is PREEMPTED (preempted?): making it again" in out
  assert len(creates(pod.calls())) == 2 and "--spot" in creates(pod.calls())[1]
  assert "done: every worker exited 0" in out
  # The new slice's workers got the code again (fresh disks): the second run ran there.
  assert (pod.dir / "starts1").read_text().strip() == "2"
  assert (pod.dir / "worker1" / "igpt_jax" / "setup.py").exists()


def test_a_dead_worker_fails_the_run_with_every_log_tail(pod):
  assert pod("create", *SLICE, "--type", "v5litepod-16")[0] == 0
  code, out = pod("run", *SLICE, *JOB, "--supervise", plan="0 1\n")
  assert code == 1, out
  assert "the job failed" in out
  assert "==== worker0: last 50 lines" in out and "==== worker1: last 50 lines" in out
  assert "RuntimeError: boom on worker 1" in out


def test_logs_status_stop_delete_and_detached_run(pod):
  assert pod("create", *SLICE, "--type", "v5litepod-16")[0] == 0
  code, out = pod("run", *SLICE, *JOB, plan="0 0\n", job_seconds=30)  # returns at once
  assert code == 0 and "started on worker0" in out and "started on worker1" in out
  code, out = pod("status", *SLICE)
  assert "slice igpt-l: READY" in out and out.count("igpt-status worker") == 2
  # `run` returns before the detached jobs start: stop them once both run (on a loaded machine
  # worker1's job had not written its pid yet, and `stop` truly found no job there).
  deadline = time.time() + 30
  while not all((pod.dir / f"worker{w}" / "igpt_run" / "job.pid").exists() for w in (0, 1)):
    assert time.time() < deadline, "the detached jobs did not start"
    time.sleep(0.1)
  code, out = pod("stop", *SLICE)  # SIGTERM: the fake job "saves" and exits 75
  assert code == 0 and "SIGTERM sent on worker0" in out and "SIGTERM sent on worker1" in out
  deadline = time.time() + 30
  while not (pod.dir / "worker1" / "igpt_run" / "exit_code").exists() and time.time() < deadline:
    time.sleep(0.1)
  code, out = pod("status", *SLICE)
  assert out.count(" 75") == 2, out
  code, out = pod("logs", *SLICE, "--worker", "1")
  assert "==== worker1" in out and "worker0" not in out
  assert pod("delete", *SLICE)[0] == 0
  assert not (pod.dir / "state").exists()
  code, out = pod("launch", *SLICE)
  assert code == 2 and "unknown command launch" in out


def test_dry_run_prints_the_gcloud_commands(pod):
  code, out = pod("create", *SLICE, "--type", "v5litepod-64", "--dry-run")
  assert code == 0
  assert "gcloud compute tpus tpu-vm create igpt-l --zone=us-central2-b --accelerator-type=v5litepod-64" in out
  code, out = pod("run", *SLICE, *JOB, "--dry-run", "--", "--config.train.steps=100")
  assert code == 0 and "--worker=all" in out and "igpt_jax.main" in out
  assert "--config.train.steps=100" in out and not (pod.dir / "calls.log").exists()
  assert "LIBTPU_INIT_ARGS" not in out  # igpt_jax.main sets its own flags on the workers
  code, out = pod("run", *SLICE, *JOB, "--dry-run", env={"LIBTPU_INIT_ARGS": "--xla_a=1 --xla_b=2"})
  assert code == 0 and "LIBTPU_INIT_ARGS=--xla_a=1" in out and "--xla_b=2" in out


def readme_pod_commands() -> list[list[str]]:
  """The README's runnable `launch/tpu_pod.sh` lines, as a user pastes them (without --dry-run,
  which a user drops to run them for real)."""
  import re
  import shlex
  text = open(os.path.join(REPO, "README.md")).read()
  block = text[text.index("Launch on a TPU pod slice"):]
  block = block[block.index("```bash") + 7:block.index("```", block.index("```bash") + 7)]
  commands = re.sub(r"\\\n\s*", " ", block).strip().splitlines()
  return [[a for a in shlex.split(c)[1:] if a != "--dry-run"] for c in commands]


def test_the_readmes_supervised_run_remakes_a_preempted_slice_as_it_was(pod):
  """`run --supervise` as the README writes it (no --type, no --spot): the slice it remakes after
  a preemption is the one `describe` reported when supervision began -- a spot v5litepod-64."""
  create, run = readme_pod_commands()
  assert create[0] == "create" and "--spot" in create and run[0] == "run" and "--type" not in run
  assert pod(*create)[0] == 0
  code, out = pod(*run, plan="P P\n0 0\n")
  assert code == 0, out
  assert "supervising igpt-l (v5litepod-64, spot)" in out
  remade = creates(pod.calls())[1]
  assert "--accelerator-type=v5litepod-64" in remade and "--spot" in remade
  assert "--version=v2-alpha-tpuv5-lite" in remade


def test_a_queued_slice_is_remade_through_a_queued_resource(pod):
  assert pod("create", *SLICE, "--type", "v5p-128", "--queued")[0] == 0
  code, out = pod("run", *SLICE, *JOB, "--supervise", plan="P P\n0 0\n")
  assert code == 0, out
  remade = creates(pod.calls())[1]
  assert "queued-resources create" in remade and "--accelerator-type=v5p-128" in remade
  pod("delete", *SLICE)
  code, out = pod("run", *SLICE, *JOB, "--supervise")  # nothing to describe, no --type
  assert code == 2 and "was not found" in out
