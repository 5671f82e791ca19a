"""Several processes on this machine (launch/local.sh: jax.distributed, gloo collectives over
127.0.0.1, simulated CPU devices): every stage, mesh equivalence, preemption, a dead host."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, xla_flags
from igpt_jax.data import sources
from igpt_jax.data.sources import fashion_mnist as fmnist_source

pytestmark = pytest.mark.skipif(sources.fashion_mnist_dir() is None,
                                reason="Debian's dataset-fashion-mnist is not installed")

# 2 layers of width 32 on 8x8 Fashion-MNIST, batch 16, every step logged.
TINY = ["--config=configs/demo.py", "--config.data.resolution=8", "--config.model.num_layers=2",
        "--config.model.d_model=32", "--config.model.num_heads=4", "--config.train.batch_size=16",
        "--config.train.log_every=1",
        "--config.train.eval_every=0", "--config.train.sample_every=0",
        "--config.train.warmup_steps=5", "--config.palette.samples=20000",
        "--config.palette.iters=5", "--config.checkpoint.every=1000"]
# The learning-rate schedule depends on it: every run here uses the same. At 8x8 a step takes
# ~30 ms, so the SIGTERM sent after step 3 needs the ~57 steps after it to land mid-run.
STEPS = 60


def env(devices, fast_compile=True):
  """Compiles far outnumber steps here, except where a process must be busy computing."""
  return {**os.environ, "XLA_FLAGS": xla_flags(devices, fast_compile),
          "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def local(n, d, *args, timeout=600):
  """launch/local.sh -n n -d d -- args; returns (returncode, output)."""
  proc = subprocess.run(["bash", f"{REPO}/launch/local.sh", "-n", str(n), "-d", str(d), "--",
                         *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, "XLA_FLAGS": xla_flags()})  # local.sh adds the devices
  return proc.returncode, proc.stdout + proc.stderr


def single(devices, *args, timeout=600):
  proc = subprocess.run([sys.executable, "-m", "igpt_jax.main", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout, env=env(devices))
  return proc.returncode, proc.stdout + proc.stderr


def signal_one_of_two(args, sig, ready, timeout=300):
  """launch/local.sh -n 2 -d 2 -- args; once `ready(output so far)` is true, `sig` goes to
  process 1 alone. Returns (exit status, output, seconds from the signal to the exit)."""
  import threading
  launcher = subprocess.Popen(["bash", f"{REPO}/launch/local.sh", "-n", "2", "-d", "2", "--",
                               *args], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "XLA_FLAGS": xla_flags()})
  lines = []
  reader = threading.Thread(target=lambda: lines.extend(iter(launcher.stdout.readline, "")),
                            daemon=True)
  reader.start()
  deadline = time.time() + timeout
  def pid_of_1():
    return [int(l.split()[4]) for l in lines if l.startswith("[local] process 1 pid")]

  while not (pid_of_1() and ready("".join(lines))):
    assert time.time() < deadline and launcher.poll() is None, "".join(lines)[-3000:]
    time.sleep(0.02)
  [pid] = pid_of_1()
  os.kill(pid, sig)
  signalled = time.time()
  launcher.wait(timeout=timeout)
  took = time.time() - signalled
  stage = next(a.split("=", 1)[1] for a in args if a.startswith("--config.stage="))
  print(f"{stage}: exit {launcher.returncode} {took:.1f} s after {sig.name} to process 1")
  reader.join(timeout=10)
  return launcher.returncode, "".join(lines), took


def losses(workdir, name="metrics.jsonl"):
  with open(os.path.join(workdir, name)) as f:
    return np.array([json.loads(line)["loss"] for line in f if line.strip()])


def last_json(output, prefix=""):
  lines = [l[len(prefix):] for l in output.splitlines() if l.startswith(prefix + "{")]
  return json.loads(lines[-1])


@pytest.fixture(scope="module")
def palette_and_reference(tmp_path_factory):
  """A fitted palette, and one process x 4 devices pretraining STEPS steps (data mesh)."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  code, out = single(4, *TINY, "--config.stage=pretrain", f"--workdir={workdir}",
                     f"--config.train.steps={STEPS}")
  assert code == 0, out[-3000:]
  return os.path.join(workdir, "palette.npz"), losses(workdir)


@pytest.fixture(scope="module")
def two_process_data_run(palette_and_reference, tmp_path_factory):
  """2 processes x 2 devices, data mesh, STEPS steps: (workdir, launcher output)."""
  workdir = tmp_path_factory.mktemp("two_data")
  shutil.copy(palette_and_reference[0], workdir / "palette.npz")
  code, out = local(2, 2, *TINY, "--config.stage=pretrain", f"--workdir={workdir}",
                    f"--config.train.steps={STEPS}")
  assert code == 0, out[-3000:]
  return workdir, out


def test_two_processes_train_like_one_on_a_data_mesh(palette_and_reference, two_process_data_run):
  workdir, out = two_process_data_run
  assert "over 2 processes" in out
  assert '[1] {"stage": "pretrain", "step": %d' % STEPS in out  # both processes finished
  np.testing.assert_allclose(losses(workdir), palette_and_reference[1], rtol=1e-5)
  # Every host's step and input times are gathered at each log step; the slowest is named.
  assert "[0] hosts: " in out and "slowest host: process" in out
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert all(r["slowest_host"] in (0, 1) and r["host_step_s_max"] > 0 for r in rows)
  # Only process 0 writes metrics and TensorBoard events.
  assert len(os.listdir(workdir / "tensorboard")) == 1


def test_streamed_probe_on_two_processes_writes_each_row_once(two_process_data_run, tmp_path):
  """The probe at scale on 2 processes: each writes its rows of every batch, the mini-batch
  solver trains over both hosts' chunks, and it agrees with one process."""
  workdir, _ = two_process_data_run
  single_dir = tmp_path / "single"
  shutil.copytree(workdir, single_dir)
  args = [*TINY, "--config.stage=probe", "--config.probe.solver=adam", "--config.probe.epochs=20",
          "--config.probe.fit_batch_size=256", "--config.probe.train_examples=2000",
          "--config.probe.validation_examples=500", "--config.probe.test_examples=1000"]
  code, out = local(2, 2, *args, f"--workdir={workdir}")
  assert code == 0, out[-3000:]
  meta = json.load(open(workdir / "probe" / "features" / "pretrained-train" / "meta.json"))
  assert sorted(meta["ranges"]) == ["0", "128"]  # batch 256: rows 0-127 and 128-255
  labels = [np.load(workdir / "probe" / "features" / "pretrained-train" / f"{name}.labels.npy")
            for written in meta["ranges"].values() for name in written["chunks"]]
  assert sum(int((y >= 0).sum()) for y in labels) == 2000  # every example once, padding marked
  code, one = single(4, *args, f"--workdir={single_dir}")
  assert code == 0, one[-3000:]
  two = json.load(open(workdir / "probe" / "results.json"))
  one = json.load(open(single_dir / "probe" / "results.json"))
  assert two["best_accuracy"] > 0.5
  for a, b in zip(one["by_layer"], two["by_layer"], strict=True):
    assert abs(a["accuracy"] - b["accuracy"]) < 0.03, (one["by_layer"], two["by_layer"])


@pytest.mark.parametrize("devices,mesh", [
    (2, ["--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]),
    (1, ["--config.mesh.data=1", "--config.mesh.tensor=2"]),  # tensor parallel across processes
], ids=["fsdp_tensor", "tensor_across_processes"])
def test_two_processes_train_like_one(palette_and_reference, tmp_path, devices, mesh):
  palette, reference = palette_and_reference
  shutil.copy(palette, tmp_path / "palette.npz")
  code, out = local(2, devices, *TINY, *mesh, "--config.stage=pretrain", f"--workdir={tmp_path}",
                    f"--config.train.steps={STEPS}")
  assert code == 0, out[-3000:]
  assert "over 2 processes" in out
  np.testing.assert_allclose(losses(tmp_path), reference, rtol=1e-5)


def test_two_slices_train_like_one_process_through_two_sigterms_to_one_slice(
    palette_and_reference, two_process_data_run, tmp_path):
  """Multislice for real: mesh.slices=2 on 2 processes x 2 devices (each process a slice, the
  data axis across them as over DCN). SIGTERM to slice 1 twice: both save the same step and exit
  75; resumed twice, the losses are those of one process of 4 devices (and, bit for bit, of the
  uninterrupted 2-process run), and goodput.json accounts for the three attempts."""
  palette, reference = palette_and_reference
  shutil.copy(palette, tmp_path / "palette.npz")
  args = [*TINY, "--config.stage=pretrain", f"--workdir={tmp_path}", f"--config.train.steps={STEPS}",
          "--config.mesh.slices=2"]
  metrics = tmp_path / "metrics.jsonl"
  walls, saved = [], []
  for attempt in range(2):  # each time 3 more logged steps, then SIGTERM to process 1
    logged = saved[-1] if saved else 0
    began = time.time()
    code, out, _ = signal_one_of_two(args, signal.SIGTERM, lambda _: metrics.exists() and max(
        [json.loads(l)["step"] for l in metrics.read_text().splitlines() if l.strip()] or [0])
        >= logged + 3)
    walls.append(time.time() - began)
    assert code == 75, out[-3000:]  # saved, not done: both processes waited for
    assert "[local] preempted after a save" in out  # (the launcher killed neither)
    if attempt:
      assert f"Resumed from checkpoint step {saved[-1]}" in out
    else:  # the data axis spans both slices
      assert "mesh {'data': 4, 'fsdp': 1, 'tensor': 1} over 2 processes" in out
    steps = [int(l.split("saved step ")[1].split(",")[0]) for l in out.splitlines()
             if "Preemption signal: saved step" in l]
    assert len(steps) == 2 and steps[0] == steps[1] < STEPS, out[-3000:]
    saved.append(steps[0])
    assert max(map(int, os.listdir(tmp_path / "checkpoints" / "pretrain"))) == steps[0]

  began = time.time()
  code, out = local(2, 2, *args)
  walls.append(time.time() - began)
  assert code == 0, out[-3000:]
  assert f"Resumed from checkpoint step {saved[1]}" in out
  resumed = losses(tmp_path)
  assert len(resumed) == STEPS
  np.testing.assert_allclose(resumed, reference, rtol=1e-5)
  assert resumed.tolist() == losses(two_process_data_run[0]).tolist()
  report = json.load(open(tmp_path / "goodput.json"))  # process 0's events
  assert report["attempts"] == 3 and report["lost_steps"] == [0, 0]
  assert [r["steps"] for r in report["by_attempt"]] == [
      [1, saved[0]], [saved[0] + 1, saved[1]], [saved[1] + 1, STEPS]]
  # The launcher's wall time holds both processes' start and end: process 0's is within it.
  print(f"goodput: wall {report['wall_s']:.2f} s; launcher {sum(walls):.2f} s")
  assert report["wall_s"] == pytest.approx(sum(walls), rel=0.05) and report["wall_s"] < sum(walls)
  assert report["productive_s"] + sum(report["badput_s"].values()) == pytest.approx(
      report["wall_s"], rel=0.05)
  assert 0 < report["goodput"] <= 1
  assert sorted(os.listdir(tmp_path / "goodput")) == ["process-0.jsonl", "process-1.jsonl"]


def test_a_killed_process_makes_the_other_exit_nonzero_quickly(palette_and_reference, tmp_path):
  palette, _ = palette_and_reference
  shutil.copy(palette, tmp_path / "palette.npz")
  port = 20000 + os.getpid() % 20000
  procs = [subprocess.Popen(
      [sys.executable, "-m", "igpt_jax.main", *TINY, "--config.stage=pretrain",
       f"--workdir={tmp_path}", "--config.train.steps=100000",
       f"--coordinator_address=127.0.0.1:{port}", "--process_count=2", f"--process_index={i}",
       "--heartbeat_timeout_seconds=20"],
      cwd=REPO, env=env(2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  deadline = time.time() + 240
  while not (tmp_path / "metrics.jsonl").exists() and time.time() < deadline:
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGKILL)
  killed = time.time()
  try:
    procs[0].wait(timeout=120)
  finally:
    procs[0].kill()
  print(f"survivor exited {time.time() - killed:.0f} s after its peer was killed")
  assert procs[0].returncode != 0
  assert "another task died" in procs[0].stderr.read()


def two_processes(tmp_path, args, wrap=(None, None), timeout=300, only=None, fast_compile=True):
  """Processes 0 and 1 started by hand (each may run under its own wrapper command);
  [(returncode, stderr)] of both, or of process `only` alone (the other is then killed)."""
  port = 20000 + (os.getpid() * 7) % 20000
  procs = [subprocess.Popen(
      [*(wrap[i] or []), sys.executable, "-m", "igpt_jax.main", *args,
       f"--coordinator_address=127.0.0.1:{port}", "--process_count=2", f"--process_index={i}",
       "--heartbeat_timeout_seconds=20"],
      cwd=REPO, env=env(1, fast_compile), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  try:
    waited = procs if only is None else [procs[only]]
    return [(p.wait(timeout=timeout), p.stderr.read()) for p in waited]
  finally:
    for p in procs:
      p.kill()


def test_a_process_that_does_not_see_the_workdir_stops_the_run(tmp_path):
  """Process 1 runs in its own mount namespace with an empty file system over the workdir:
  it cannot see what process 0 writes there. Both stop at start, naming process 1."""
  probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
  if probe.returncode != 0:
    pytest.skip("cannot make a mount namespace here (needs root): " + probe.stderr.decode()[:80])
  workdir = tmp_path / "shared"
  workdir.mkdir()
  hide = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs tmpfs "{workdir}" && exec "$0" "$@"']
  results = two_processes(tmp_path, [*TINY, "--config.stage=pretrain", f"--workdir={workdir}",
                                     "--config.train.steps=2"], wrap=(None, hide))
  for code, err in results:
    assert code == 2, err[-2000:]
    assert "error: Processes disagree on the workdir" in err and "process 1 sees 'nothing" in err
  assert not (workdir / "checkpoints").exists()


def test_a_process_missing_a_barrier_is_named(tmp_path):
  """Process 0 fits the palette (3000 k-means iterations, ~30 s or more) while process 1 waits
  at the palette barrier with a 3 s timeout: process 1 stops in one line naming process 0 (which
  is then killed, not waited for)."""
  [(code, err)] = two_processes(tmp_path, [*TINY, "--config.stage=fit_palette",
                                           f"--workdir={tmp_path}", "--config.palette.samples=200000",
                                           "--config.palette.iters=3000",
                                           "--barrier_timeout_seconds=3"], only=1,
                                fast_compile=False)  # k-means at full speed: less CPU for 1
  assert code == 1, err[-2000:]
  [line] = [l for l in err.splitlines() if l.startswith("error:")]
  assert "process(es) [0] did not reach the 'fit_palette' barrier within 3 s" in line


def make_uneven_numpy_source(path):
  """256 Fashion-MNIST train images and 9 test images: 9 does not split over 2 hosts."""
  directory = sources.fashion_mnist_dir()
  train = fmnist_source.load_fashion_mnist(directory, "train", 1)
  test = fmnist_source.load_fashion_mnist(directory, "test", 1)
  np.savez(path, train_images=train.images[:256, ..., 0], train_labels=train.labels[:256],
           test_images=test.images[:9, ..., 0], test_labels=test.labels[:9])


def test_every_stage_on_two_processes_agrees_with_one(tmp_path):
  make_uneven_numpy_source(tmp_path / "data.npz")
  args = [*TINY, "--config.stage=all", "--config.data.source=numpy",
          f"--config.data.path={tmp_path / 'data.npz'}", "--config.train.steps=8",
          "--config.train.eval_every=4", "--config.train.sample_every=8",
          "--config.train.batch_size=4", "--config.finetune.steps=4",
          "--config.finetune.eval_every=4", "--config.probe.steps=20", "--config.sample.num=2",
          "--config.sample.completions=2", "--config.palette.samples=5000",
          "--config.probe.labels_per_class=5", "--config.probe.low_data_seeds=2"]
  code, one = single(4, *args, f"--workdir={tmp_path / 'one'}")
  assert code == 0, one[-3000:]
  code, two = local(2, 2, *args, f"--workdir={tmp_path / 'two'}")
  assert code == 0, two[-3000:]
  a, b = last_json(one), last_json(two, "[0] ")
  assert last_json(two, "[1] ")["test_bits_per_dim"] == b["test_bits_per_dim"]
  for key in ("test_bits_per_dim", "best_accuracy", "random_init_accuracy", "raw_pixel_accuracy",
              "finetune_accuracy"):
    np.testing.assert_allclose(b[key], a[key], rtol=1e-4, err_msg=key)
  assert a["best_layer"] == b["best_layer"]
  # Low-data probes: the same draws and fits on every process, and as on one.
  low_one, low_two = (json.load(open(tmp_path / run / "probe" / "results.json"))["low_data"]
                      for run in ("one", "two"))
  assert [x["train_examples"] for x in low_two] == [50]
  for x, y in zip(low_one[0]["by_layer"], low_two[0]["by_layer"], strict=True):
    np.testing.assert_allclose(y["accuracies"], x["accuracies"], rtol=1e-4)
  np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)
  rows = [json.loads(l) for l in open(tmp_path / "two" / "metrics.jsonl")]
  assert [r["step"] for r in rows if "eval_loss" in r] == [4, 8]  # the 9-image split, twice
  for name in ("report.md", "evaluate.json", "probe/results.json", "samples/completions.png",
               "finetune/metrics.jsonl", "palette.npz"):
    assert os.path.exists(tmp_path / "two" / name), name


INTERLEAVED = r'''
import sys
import jax, numpy as np
from jax.experimental import multihost_utils
from igpt_jax import distributed, sharding
from igpt_jax.data import pipeline, sources
distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
# A TPU-like device order: the data axis alternates between the processes' devices, so each
# process holds rows 0-1 and 4-5 (or 2-3 and 6-7) of a batch of 8: not one contiguous range.
devices = sorted(jax.devices(), key=lambda d: (d.id % 2, d.process_index))
mesh = jax.sharding.Mesh(np.asarray(devices).reshape(4, 1, 1), sharding.MESH_AXES)
rows = sharding.host_rows(mesh, sharding.DEFAULT_RULES, 8)
assert rows[-1] - rows[0] + 1 != len(rows), rows
images = np.arange(40 * 4, dtype=np.uint8).reshape(40, 2, 2, 1) % 251
data = sources.from_arrays(images, np.arange(40))
mine = pipeline.train_batches(data, batch_size=8, seed=3, rows=rows, prefetch=0)
whole = pipeline.train_batches(data, batch_size=8, seed=3, prefetch=0)
for step in range(6):
  local, full = next(mine), next(whole)
  g = sharding.global_batch({k: local[k] for k in ("images", "labels")}, mesh,
                            sharding.DEFAULT_RULES, 8)
  doubled = jax.jit(lambda x: x * 2)(g["labels"])  # a step over the mesh
  for key, value in (("images", g["images"]), ("labels", g["labels"])):
    np.testing.assert_array_equal(multihost_utils.process_allgather(value, tiled=True), full[key])
  np.testing.assert_array_equal(multihost_utils.process_allgather(doubled, tiled=True),
                                2 * full["labels"])
print("ok", jax.process_index(), rows.tolist(), flush=True)
'''


def test_two_processes_feed_an_interleaved_device_order(tmp_path):
  """What a TPU slice's device order does to the input: each process feeds the non-contiguous
  rows its devices hold, and the global batch is the one a single process would build."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  script = tmp_path / "interleaved.py"
  script.write_text(INTERLEAVED)
  procs = [subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{port}", str(i)], cwd=REPO,
                            env=env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs, strict=True):
    assert p.returncode == 0, out[-3000:]
  assert "ok 0 [0, 1, 4, 5]" in outs[0] and "ok 1 [2, 3, 6, 7]" in outs[1], outs


def test_ctrl_c_or_sigterm_to_one_process_stops_evaluate_and_probe_on_both(
    two_process_data_run, tmp_path):
  """Outside the training loop too, a stop reaches every process: both exit 75 within the 30 s
  a TPU VM gives, and the same command continues -- the probe from its whole feature chunks,
  to the results an uninterrupted run gives."""
  workdir = tmp_path / "run"
  for copy in (workdir, tmp_path / "reference"):  # the pretrained run, without a probe's files
    shutil.copytree(two_process_data_run[0], copy, ignore=shutil.ignore_patterns("probe"))
  evaluate = [*TINY, "--config.stage=evaluate", f"--workdir={workdir}"]
  code, out, took = signal_one_of_two(evaluate, signal.SIGTERM,
                                      lambda out: "Loaded pretrained parameters" in out)
  assert code == 75 and took < 30, (code, took, out[-3000:])
  assert "[0] evaluate: stopped" in out and "[1] evaluate: stopped" in out
  assert not (workdir / "evaluate.json").exists()
  code, out = local(2, 2, *evaluate)
  assert code == 0, out[-3000:]
  # As an uninterrupted evaluation (here: one process of 8 devices) gives.
  from igpt_jax.stages import evaluate as evaluate_stage
  from test_train import tiny_config  # TINY's model and batch
  config = tiny_config()
  config.stage = "evaluate"
  straight = evaluate_stage.run(config, str(tmp_path / "reference"), log=lambda *_: None)
  resumed = json.load(open(workdir / "evaluate.json"))
  for key in ("validation_bits_per_dim", "test_bits_per_dim"):
    np.testing.assert_allclose(resumed[key], straight[key], rtol=1e-5, err_msg=key)

  # 20k train images in batches of 16: ~1250 collective steps per store, in chunks of ~250.
  probe = [*TINY, "--config.stage=probe", "--config.probe.train_examples=20000",
           "--config.probe.validation_examples=500", "--config.probe.test_examples=500",
           "--config.probe.batch_size=16", "--config.probe.max_memory_mb=1",
           "--config.probe.solver=lbfgs", "--config.probe.steps=20"]
  chunks = workdir / "probe" / "features" / "pretrained-train"
  code, out, took = signal_one_of_two([*probe, f"--workdir={workdir}"], signal.SIGTERM,
                                      lambda _: any(chunks.glob("r*-c00000.labels.npy")))
  assert code == 75 and took < 30, (code, took, out[-3000:])
  assert "[0] probe: stopped" in out and "[1] probe: stopped" in out
  stopped = out
  code, out = local(2, 2, *probe, f"--workdir={workdir}")
  assert code == 0, out[-3000:]
  assert "features: resuming after" in out, stopped[-3000:]  # the whole chunks were kept
  code, ref = local(2, 2, *probe, f"--workdir={tmp_path / 'reference'}")
  assert code == 0, ref[-3000:]
  resumed, uninterrupted = (json.load(open(w / "probe" / "results.json"))
                            for w in (workdir, tmp_path / "reference"))
  for key in ("by_layer", "random_init_by_layer", "raw_pixel_accuracy", "multi_layer"):
    assert resumed[key] == uninterrupted[key], key


def test_ctrl_c_to_one_process_stops_process_0s_palette_fit_on_both(tmp_path):
  """Process 0 fits the palette alone while process 1 waits at a barrier: Ctrl-C to process 1
  (handed to JAX's notifier as a SIGTERM) stops process 0's k-means (it reads the notice from
  the coordination service) and both exit 75; no half palette is left."""
  args = [*TINY, "--config.stage=fit_palette", f"--workdir={tmp_path}",
          "--config.palette.samples=200000", "--config.palette.iters=3000"]
  code, out, took = signal_one_of_two(args, signal.SIGINT,
                                      lambda out: "k-means iteration 1/3000" in out)
  assert code == 75 and took < 30, (code, took, out[-3000:])
  assert "[0] fit_palette: stopped" in out and "[1] fit_palette: stopped (SIGINT)" in out
  assert not (tmp_path / "palette.npz").exists()
