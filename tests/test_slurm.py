"""launch/gpu_slurm.sh under a real SLURM: munged, slurmctld and slurmd (Debian's slurm-wlm and
munge) started here on localhost, as root; 2 tasks of a tiny pretraining on CPU devices."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest

from conftest import REPO, xla_flags
from test_multihost import TINY, local, losses

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")


def _why_not() -> str | None:
  if os.geteuid() != 0:
    return "a localhost SLURM needs root (slurmd runs jobs as their users)"
  missing = [d for d in DAEMONS if not shutil.which(d, path=os.environ["PATH"] + ":/usr/sbin")]
  if missing:
    return f"{', '.join(missing)} not installed (make test installs slurm-wlm and munge as root)"
  return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


SLURM_CONF = """\
ClusterName=igpt
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.sock
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
  """A one-node cluster; yields the environment its commands need (SLURM_CONF)."""
  root = tmp_path_factory.mktemp("slurm")
  for d in ("state", "spool"):
    (root / d).mkdir()
  (root / "munge.key").write_bytes(os.urandom(1024))
  os.chmod(root / "munge.key", 0o600)
  (root / "slurm.conf").write_text(SLURM_CONF.format(
      root=root, ctld_port=free_port(), slurmd_port=free_port(), cpus=os.cpu_count()))
  env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf"),
         "PATH": os.environ["PATH"] + ":/usr/sbin"}
  env["XLA_FLAGS"] = xla_flags()
  subprocess.run(["munged", "--force", f"--socket={root}/munge.sock", f"--key-file={root}/munge.key",
                  f"--log-file={root}/munged.log", f"--pid-file={root}/munged.pid",
                  f"--seed-file={root}/munged.seed"], check=True, env=env)
  subprocess.run(["slurmctld", "-f", str(root / "slurm.conf")], check=True, env=env)
  subprocess.run(["slurmd", "-f", str(root / "slurm.conf"), "-N", "localhost"], check=True, env=env)
  try:
    deadline = time.time() + 60
    while time.time() < deadline:
      out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env)
      if out.stdout.strip() == "idle":
        break
      time.sleep(0.5)
    else:
      pytest.fail(f"the localhost SLURM did not come up: {out.stdout} {out.stderr}\n"
                  + (root / "slurmctld.log").read_text()[-2000:])
    yield env
  finally:
    for pid_file in ("slurmd.pid", "slurmctld.pid", "munged.pid"):
      try:
        os.kill(int((root / pid_file).read_text()), signal.SIGTERM)
      except (OSError, ValueError):
        pass


# Long enough that the TERM, sent once 5 steps are logged, lands mid-run: at 8x8 a step takes
# ~30 ms here (the TERM needs ~1 s to arrive), so 30 steps could end before it did.
STEPS = 120


def job_state(job: str, env) -> dict:
  out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True,
                       env=env).stdout
  return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_until(condition, deadline: float, what: str, log) -> None:
  """Polls until `condition()`; past the deadline, fails naming what did not happen."""
  while not condition():
    if time.time() > deadline:
      text = log.read_text() if log.exists() else "(no job log yet)"
      raise AssertionError(f"{what} by the deadline; the job's log ends:\n{text[-3000:]}")
    time.sleep(0.5)


def test_slurm_job_is_preempted_requeued_and_resumes_to_the_same_losses(slurm, tmp_path):
  workdir, log = tmp_path / "run", tmp_path / "job.log"
  # The same palette as the uninterrupted reference below, so only the training is compared.
  reference = tmp_path / "reference"
  code, out = local(2, 1, *TINY, "--config.stage=pretrain", f"--workdir={reference}",
                    f"--config.train.steps={STEPS}")
  assert code == 0, out[-3000:]
  workdir.mkdir()
  shutil.copy(reference / "palette.npz", workdir / "palette.npz")
  began = time.time()
  job = subprocess.run(
      ["sbatch", "--parsable", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=15",
       f"--output={log}", f"--chdir={REPO}", "launch/gpu_slurm.sh", "configs/demo.py",
       str(workdir), *TINY[1:], "--config.stage=pretrain", f"--config.train.steps={STEPS}"],
      capture_output=True, text=True, env={**slurm, "JAX_PLATFORMS": "cpu"}, cwd=REPO,
      check=True).stdout.strip()
  deadline = time.time() + 300
  metrics = workdir / "metrics.jsonl"

  def mid_run():
    assert job_state(job, slurm).get("JobState") in ("PENDING", "RUNNING"), log.read_text()[-3000:]
    return metrics.exists() and len(metrics.read_text().splitlines()) >= 5
  wait_until(mid_run, deadline, "5 steps logged", log)
  subprocess.run(["scancel", "--signal=TERM", job], check=True, env=slurm)
  signalled = time.time()

  def requeued_after_the_save():
    state = job_state(job, slurm)
    assert state.get("JobState") != "COMPLETED", "the run ended before the TERM reached it"
    return state.get("Restarts") == "1" and state.get("JobState") == "PENDING"
  wait_until(requeued_after_the_save, deadline, "saved, exited 75 and requeued", log)
  requeued = time.time()
  # SLURM holds a requeued job for ~2 minutes before it may start again. Let it start once the
  # first run's step processes are gone and the clock has moved past its credential's
  # revocation (slurmd compares whole seconds: a start in the same second is refused).
  wait_until(lambda: subprocess.run(["pgrep", "-f", rf"slurmstepd: \[{job}\."],
                                    capture_output=True).returncode != 0,
             deadline, "the first run's step processes gone", log)
  time.sleep(3)
  subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, env=slurm)

  def completed():
    state = job_state(job, slurm).get("JobState")
    assert state in ("PENDING", "RUNNING", "COMPLETING", "COMPLETED"), log.read_text()[-3000:]
    return state == "COMPLETED"
  wait_until(completed, deadline, "the requeued job completed", log)
  done = time.time()
  text = log.read_text()
  state = job_state(job, slurm)
  assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", text[-3000:]
  saved = {int(l.split("saved step ")[1].split(",")[0]) for l in text.splitlines()
           if "Preemption signal: saved step" in l}
  assert len(saved) == 1 and 0 < min(saved) < STEPS, text[-3000:]
  # srun says "task 0: ..." per task, or "tasks 0-1: ..." when they end together.
  assert re.search(r"tasks? 0(-1)?: Exited with exit code 75", text) and "requeueing job" in text
  assert text.count(f"Resumed from checkpoint step {min(saved)}") == 2  # both tasks ("0: ", "1: ")
  assert "0: Preemption signal" in text and "1: Preemption signal" in text  # srun --label
  assert losses(workdir).tolist() == losses(reference).tolist()
  print(json.dumps({"saved_step": min(saved),
                    "slurm_to_first_steps_s": round(signalled - began, 1),
                    "term_to_requeued_s": round(requeued - signalled, 1),
                    "requeued_to_completed_s": round(done - requeued, 1)}))
