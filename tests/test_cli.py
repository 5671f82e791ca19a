"""The command line: --help, misspelt overrides, where outputs went."""
import json
import os
import subprocess
import sys

from conftest import REPO


def cli(*args, cwd=REPO):
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "igpt_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def test_help_lists_stages_and_common_overrides():
  out = cli("--help")
  assert out.returncode == 0
  for stage in ("fit_palette", "pretrain", "evaluate", "probe", "finetune", "sample", "plan", "all"):
    assert stage in out.stdout
  assert "--config.train.steps" in out.stdout and "--workdir" in out.stdout


def test_misspelt_override_names_the_closest_key_in_one_line():
  out = cli("--config=configs/demo.py", "--config.trian.steps=3")
  assert out.returncode != 0
  assert out.stderr.strip() == ("error: --config.trian.steps is not a field of configs/demo.py. "
                                "Did you mean --config.train.steps?")
  out = cli("--config", "configs/demo.py", "--config.model.dmodel=3")
  assert "Did you mean --config.model.d_model?" in out.stderr and "Traceback" not in out.stderr


def test_default_workdir_is_timestamped_under_runs_and_stage_says_where(tmp_path):
  out = cli(f"--config={REPO}/configs/igpt_s.py", "--config.stage=plan", cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  (run,) = os.listdir(tmp_path / "runs")
  assert run.startswith("igpt_s-") and len(run) == len("igpt_s-20261122-120000")
  assert f"plan done; outputs in {tmp_path / 'runs' / run}" in out.stdout
  assert json.loads(out.stdout.strip().splitlines()[-1])["params"] == 76_571_648
