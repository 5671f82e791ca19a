"""benchmarks/gpu_suite.py end to end on the CPU at toy sizes (--smoke), so that what reaches a
lent GPU has run: every part's code path, the time limits, the summary against the targets."""
import json
import os
import subprocess
import sys


from conftest import REPO, xla_flags

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import gpu_suite  # noqa: E402


def test_every_train_run_config_loads_with_its_overrides():
  for part, (name, overrides, _) in gpu_suite.TRAIN_RUNS.items():
    config = gpu_suite.train_config(name, overrides, smoke=False)
    assert config.model.dtype == "bfloat16" and config.model.attention == "cudnn", part
  assert gpu_suite.train_config("igpt_l", gpu_suite.TRAIN_RUNS["mfu_l"][1], False).model.remat == "full"
  assert sum(gpu_suite.PART_LIMIT_S.values()) <= 900  # the window: 15 minutes in all


def test_smoke_run_of_the_suite(tmp_path):
  # One CPU device (the suite's parts assume one accelerator), compiled fast: paths, not speed.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}
  script = os.path.join(REPO, "benchmarks", "gpu_suite.py")
  images = tmp_path / "images"
  subprocess.run([sys.executable, script, "--smoke", "--prepare_images", str(images)], env=env,
                 check=True, capture_output=True, timeout=300)
  out = tmp_path / "suite.jsonl"
  proc = subprocess.run([sys.executable, script, "--smoke", "--images", str(images), "--out",
                         str(out), "--parts", "preflight,mfu_l,input_e2e,sample_s,plan_cuda"],
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  records = [json.loads(l) for l in open(out)]
  parts = {r.get("part"): r for r in records if "part" in r}
  assert parts["preflight"]["missing"] == [] and parts["preflight"]["platform"] == "cpu"
  assert parts["mfu_l"]["tokens_per_s"] > 0 and parts["mfu_l"]["remat"] == "full"
  assert parts["input_e2e"]["log_rows"] >= 2 and parts["input_e2e"]["ratio"] > 0
  assert parts["sample_s"]["tokens_per_s"] > 0 and parts["sample_s"]["bytes_read"] > 0
  assert parts["plan_cuda"]["per_device_gib"] > 0
  summary = records[-1]
  assert summary["failed_parts"] == [] and summary["summary"]["input_e2e"]["value"] > 0


def test_a_part_past_its_limit_is_cut_off_and_the_rest_still_run(monkeypatch):
  monkeypatch.setitem(gpu_suite.PART_LIMIT_S, "preflight", 0.001)
  args = gpu_suite.argparse.Namespace(images="", gpu_target="h200", smoke=True, site="")
  import time
  cut = gpu_suite.run_part("preflight", args, deadline=time.monotonic() + 100)
  assert cut == [{"part": "preflight", "skipped": "the suite's time budget is spent"}]
  monkeypatch.setitem(gpu_suite.PART_LIMIT_S, "preflight", 11)
  monkeypatch.setattr(gpu_suite.subprocess, "run", _hang)
  cut = gpu_suite.run_part("preflight", args, deadline=time.monotonic() + 100)
  assert cut == [{"part": "preflight", "error": "cut off after 11 s (its limit)"}]
  summary = gpu_suite.summary(cut + [{"part": "sample_s", "fraction_of_bound": 0.7}])
  assert summary["failed_parts"] == ["preflight"] and summary["summary"]["sample_s"]["met"]


def _hang(cmd, timeout, **_):
  raise subprocess.TimeoutExpired(cmd, timeout)
