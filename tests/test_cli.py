"""The command line: --help, misspelt overrides, where outputs went."""
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from conftest import REPO, xla_flags
from igpt_jax import config as config_lib
from igpt_jax import main as main_lib


def cli(*args, cwd=REPO, devices=None, **env_vars):
  env = {**os.environ, "XLA_FLAGS": xla_flags(devices), "JAX_PLATFORMS": "cpu", **env_vars}
  return subprocess.run([sys.executable, "-m", "igpt_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def cli_many(*cases, **env_vars):
  """Several command lines from one process (tests/cli_cases.py forks one child per case):
  the same entry point and exit status as `cli`, without a process start each."""
  env = {**os.environ, "XLA_FLAGS": xla_flags(), "JAX_PLATFORMS": "cpu", **env_vars,
         "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "cli_cases.py")],
                        input=json.dumps([list(c) for c in cases]), cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return [subprocess.CompletedProcess(c, r["returncode"], r["stdout"], r["stderr"])
          for c, r in zip(cases, json.loads(proc.stdout), strict=True)]


def test_help_lists_stages_and_common_overrides():
  out = cli("--help")
  assert out.returncode == 0
  for stage in config_lib.STAGES:
    assert re.search(rf"\b{stage}\b", out.stdout), stage
  assert "--config.train.steps" in out.stdout and "--workdir" in out.stdout


def test_show_config_lists_every_field_with_its_value_and_help():
  out = cli("--config=configs/demo.py", "--config.train.steps=7", "--show_config")
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.splitlines()
  assert any(l.startswith("--config.train.steps=7  # ") for l in lines)  # after overrides
  assert ("--config.data.source='fashion_mnist'  # prepared | fashion_mnist | tfds | folder | "
          "numpy") in lines
  assert any(l.startswith("--config.data.augment='none'  # Training views (data/transform.py "
                          "quotes the paper)") for l in lines)  # a comment block above the field
  fields = [l for l in lines if l.startswith("--config.")]
  assert len(fields) == len(main_keys(config_lib.load_config_file(f"{REPO}/configs/demo.py")))
  assert [l for l in fields if "  # " not in l] == []  # every field says what it means


def main_keys(config, prefix=""):
  out = []
  for name, value in config.items():
    out += main_keys(value, f"{prefix}{name}.") if hasattr(value, "items") else [prefix + name]
  return out


def test_misspelt_override_names_the_closest_key_in_one_line():
  out, out2 = cli_many(("--config=configs/demo.py", "--config.trian.steps=3"),
                       ("--config", "configs/demo.py", "--config.model.dmodel=3"))
  assert out.returncode != 0
  assert out.stderr.strip() == ("error: --config.trian.steps is not a field of configs/demo.py. "
                                "Did you mean --config.train.steps?")
  out = out2
  assert "Did you mean --config.model.d_model?" in out.stderr and "Traceback" not in out.stderr


def test_shipped_configs_are_in_the_wheel_and_named_without_a_path(tmp_path):
  """A pip install has no checkout: `--config=demo` finds the config inside the package."""
  source = tmp_path / "source"  # a copy: building writes build/ beside setup.py
  shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
      ".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
  wheel = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                          "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(source)],
                         capture_output=True, text=True, timeout=300)
  assert wheel.returncode == 0, wheel.stderr[-2000:]
  [path] = (tmp_path / "wheel").glob("igpt_jax-*.whl")
  site = tmp_path / "site"
  zipfile.ZipFile(path).extractall(site)
  assert {"demo.py", "igpt_s.py", "igpt_m.py", "igpt_l.py", "igpt_xl.py"} <= {
      p.name for p in (site / "igpt_jax" / "configs").iterdir()}
  run = lambda *args: cli(*args, cwd=tmp_path, PYTHONPATH=str(site))  # noqa: E731
  out = run("--config=demo", "--show_config")
  assert out.returncode == 0 and "--config.model.d_model=128" in out.stdout, out.stderr[-2000:]
  assert run("--config=demo.py", "--show_config").returncode == 0
  out = run("--config=igpt_ll", "--show_config")
  assert out.returncode == 2 and out.stderr.startswith(
      "error: --config=igpt_ll: no such file. Did you mean igpt_l?"), out.stderr
  assert str(site / "igpt_jax" / "configs") in out.stderr  # the wheel's, not the checkout's


def test_default_workdir_is_timestamped_under_runs_and_stage_says_where(tmp_path):
  out = cli("--config=igpt_s", "--config.stage=plan", "--config.plan.search=false", cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  (run,) = os.listdir(tmp_path / "runs")
  assert run.startswith("igpt_s-") and len(run) == len("igpt_s-20261122-120000")
  assert f"plan done; outputs in {tmp_path / 'runs' / run}" in out.stdout
  assert json.loads(out.stdout.strip().splitlines()[-1])["params"] == 76_571_648


def test_each_stage_keeps_its_config_beside_the_runs_first(tmp_path):
  """...and a later stage runs with them: --workdir alone (that stage's own config.<stage>.json
  when it ran before, else the run's first), or --config=<workdir>/config.json."""
  demo, w = f"--config={REPO}/configs/demo.py", f"--workdir={tmp_path}"
  outs = cli_many((demo, "--config.stage=plan", "--config.model.num_layers=2", w),
                  (demo, "--config.stage=plan", "--config.train.steps=7", w),
                  (w, "--config.stage=plan"),  # again, as last time: config.plan.json
                  (w, "--config.stage=probe", "--show_config"),  # first time: config.json
                  (f"--config={tmp_path / 'config.json'}", "--config.sample.num=3",
                   "--show_config"))
  assert all(out.returncode == 0 for out in outs), [out.stderr[-2000:] for out in outs]
  config, plan = (json.loads((tmp_path / name).read_text())
                  for name in ("config.json", "config.plan.json"))
  assert config["train"]["steps"] == 200 and config["model"]["num_layers"] == 2
  assert plan["train"]["steps"] == 7 and plan["model"]["num_layers"] == 4
  assert f"Config: {tmp_path / 'config.plan.json'}" in outs[2].stdout
  assert json.loads(outs[2].stdout.splitlines()[-1])["params"] == json.loads(
      outs[1].stdout.splitlines()[-1])["params"]
  for out, stage in ((outs[3], "probe"), (outs[4], "plan")):
    lines = out.stdout.splitlines()
    assert any(l.startswith("--config.model.num_layers=2  #") for l in lines)  # the run's
    assert any(l.startswith(f"--config.stage='{stage}'  #") for l in lines)
  assert any(l.startswith("--config.sample.num=3  #") for l in outs[4].stdout.splitlines())
  assert_one_line_error(cli("--workdir=" + str(tmp_path / "new")), "holds no config.json")


def assert_one_line_error(out, expected, status=2):
  assert out.returncode == status, out.stdout[-2000:] + out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
  assert expected in lines[0], lines[0]


def test_user_errors_are_one_line_and_exit_2(tmp_path):
  demo = f"--config={REPO}/configs/demo.py"
  w = f"--workdir={tmp_path / 'w'}"
  # Each in a process of its own: the exit-2 contract as a user meets it, and mistakes about
  # the devices a process sees.
  assert_one_line_error(cli(demo, "--config.train.batch_size=0", w),
                        "--config.train.batch_size=0 must be positive")
  assert_one_line_error(cli(demo, "--config.stage=pretrain", "--config.mesh.data=3", w),
                        "Mesh {'data': 3, 'fsdp': 1, 'tensor': 1} needs 3 devices; 1 are available")
  assert_one_line_error(cli(demo, "--config.stage=pretrain", "--config.mesh.slices=2", w),
                        "does not divide the 1 devices")
  # A mesh that cannot split the batch: said before the palette is fitted (none is written).
  for stage in ("pretrain", "all"):
    out = cli(demo, f"--config.stage={stage}", "--config.mesh.fsdp=3", w, devices=3)
    assert_one_line_error(out, "The batch is split over 3 devices")
    assert not (tmp_path / "w" / "palette.npz").exists()
  # The rest from one process, a fork per command line (tests/cli_cases.py).
  (tmp_path / "empty").mkdir()
  cases = [
      ((demo, "--config.stage=fit_palette", "--config.data.source=folder",
        f"--config.data.path={tmp_path / 'missing'}", w), "does not exist"),
      ((demo, "--config.stage=fit_palette", "--config.data.source=folder",
        f"--config.data.path={tmp_path / 'empty'}", w), "No images"),
      ((demo, "--config.model.objective=gpt", w),
       "--config.model.objective='gpt' is not one of ar, bert"),
      ((demo, "--config.stage=sample", w), "run the pretrain stage first"),
      ((demo, "--config.stage=pretrain", "--process_count=2", w), "go together"),
      ((demo, "--config.stage=prepare", w), "set it"),  # no data.prepared
      ((demo, "--config.data.source=prepared", f"--config.data.prepared={tmp_path / 'nothing'}",
        w), "run `--config.stage=prepare`"),
      ((demo, "--config.data.augment=False", w),
       "--config.data.augment='False' is not one of auto, paper, wrn, crop, none"),
      ((demo, "--config.train.profile_steps=10", w), "must be 'START,END'"),
      ((demo, "--config.train.profile_steps=20,10", w), "START is after END"),
      # A newcomer's mistakes: each one line that names the setting and the fix.
      ((demo, "--config.model.remat=fulll", w), "did you mean 'full'?"),
      (("--config=configs/igpt_ll.py", w),
       "--config=configs/igpt_ll.py: no such file. Did you mean configs/igpt_l.py?"),
      ((demo, "--config.train.steps=ten", w), "--config.train.steps=ten: expects int (default 200)"),
      ((demo, "--config.stage=fit_palette", f"--config.data.path={tmp_path / 'nonexistent'}", w),
       "holds no Fashion-MNIST IDX files"),  # a given path is never replaced
      ((demo, "--config.stage=probe"), "give that run's --workdir=DIR"),
      (("--config=eval/cifar10:xl", "--show_config"), "the model size is one of s, m, l"),
      ((demo, "--config.probe.labels_per_class=4;25", w),
       "must be positive numbers of examples per class"),
      # Model fields: one check (config.model_problem), before any data is read.
      ((demo, "--config.model.remat=save_only_these_names", w),
       "--config.model.remat='save_only_these_names' is none of"),
      ((demo, "--config.model.dtype=float16", w),
       "--config.model.dtype='float16' is not one of float32, bfloat16"),
      ((demo, "--config.model.attention=cudnn", w),
       "--config.model.attention='cudnn' (flash attention) needs model.dtype='bfloat16'"),
      # Flags and stages misspelt, and a palette sample too small: one line, not absl's FATAL
      # (exit 1) or a ValueError's traceback.
      ((demo, "--work_dir=x"), "--work_dir: no such flag. Did you mean --workdir?"),
      ((demo, "--config.stage=pretrian", w), "Unknown stage 'pretrian'; did you mean 'pretrain'?"),
      ((demo, "--config.palette.samples=10", w),
       "--config.palette.samples=10 is below --config.palette.k=16"),
  ]
  for (args, expected), out in zip(cases, cli_many(*(args for args, _ in cases)), strict=True):
    assert_one_line_error(out, expected)
  assert not (tmp_path / "w" / "palette.npz").exists()  # every refusal came before the data


def test_list_fields_are_refused_in_one_sentence_in_process():
  config = config_lib.load_config_file(f"{REPO}/configs/demo.py")
  config.probe.labels_per_class = "4,25, 400"
  config_lib.validate(config)
  assert config_lib.labels_per_class(config) == [4, 25, 400]
  for bad in ("4;25", "0,4", "-3", "four"):
    config.probe.labels_per_class = bad
    with pytest.raises(config_lib.UserError, match="must be positive numbers of examples per "
                                                   "class separated by commas"):
      config_lib.validate(config)


def test_checkpoint_and_palette_mismatch_on_the_command_line(tmp_path):
  from igpt_jax.stages import pretrain as pretrain_stage
  from test_train import tiny_config
  pretrain_stage.run(tiny_config(steps=2), str(tmp_path), log=lambda *_: None)
  tiny = ["--config.data.resolution=8", "--config.model.num_layers=2", "--config.model.num_heads=4",
          "--config.train.steps=4", "--config.train.batch_size=16", "--config.palette.samples=20000"]
  demo = (f"--config={REPO}/configs/demo.py", "--config.stage=pretrain", f"--workdir={tmp_path}",
          *tiny)
  wider, more_colours, diverging = cli_many(
      (*demo, "--config.model.d_model=64"),
      (*demo, "--config.model.d_model=32", "--config.palette.k=32"),
      # A run that diverges, and (below) storage that will not serve a checkpoint: one line
      # each, exit 1.
      (*demo, "--config.model.d_model=32", "--config.train.lr=1e30",
       "--config.train.max_nonfinite_steps=2", "--config.checkpoint.every=1000"))
  assert_one_line_error(wider, "different model: d_model saved 32 vs configured 64")
  assert_one_line_error(more_colours, "has k=16 but palette.k=32")
  assert_one_line_error(diverging, "had non-finite gradients or updates", status=1)
  assert "2 steps in a row" in diverging.stderr
  assert "last good checkpoint (step 2) is kept" in diverging.stderr
  assert sorted(os.listdir(tmp_path / "checkpoints" / "pretrain")) == ["2"]
  refusing = ("import runpy, sys, orbax.checkpoint as ocp\n"
              "def refuse(*a, **k): raise OSError('PERMISSION_DENIED: 403 from storage')\n"
              "ocp.CheckpointManager.restore = refuse\n"
              "sys.argv[0] = 'igpt_jax.main'\n"
              "runpy.run_module('igpt_jax.main', run_name='__main__')\n")
  out = subprocess.run([sys.executable, "-c", refusing, f"--config={REPO}/configs/demo.py",
                        "--config.stage=pretrain", f"--workdir={tmp_path}", *tiny,
                        "--config.model.d_model=32"], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "XLA_FLAGS": xla_flags()})
  assert_one_line_error(out, "Could not read checkpoint", status=1)
  assert "PERMISSION_DENIED" in out.stderr and "nothing was changed" in out.stderr
  assert sorted(os.listdir(tmp_path / "checkpoints" / "pretrain")) == ["2"]


def test_a_config_that_contradicts_the_runs_is_one_line_naming_the_fields(tmp_path):
  """A run pretrained here: resuming its pretraining on other data, or reading its checkpoint
  with another model, is refused before anything is written, in one line that names the
  fields; a schedule may change (the run's config, a longer run)."""
  tiny = ["--config.data.resolution=8", "--config.model.num_layers=2", "--config.model.num_heads=4",
          "--config.model.d_model=32", "--config.train.batch_size=16",
          "--config.palette.samples=20000"]
  demo = (f"--config={REPO}/configs/demo.py", f"--workdir={tmp_path}", *tiny)
  first = cli(*demo, "--config.stage=pretrain", "--config.train.steps=2")
  assert first.returncode == 0, first.stderr[-2000:]
  saved = (tmp_path / "config.pretrain.json").read_text()
  other_data, other_model, longer = cli_many(
      (*demo, "--config.stage=pretrain", "--config.train.steps=3", "--config.data.source=folder",
       f"--config.data.path={tmp_path / 'photos'}"),
      (*demo, "--config.stage=evaluate", "--config.model.d_model=64"),
      (f"--workdir={tmp_path}", "--config.stage=pretrain", "--config.train.steps=3"))
  assert_one_line_error(other_data, f"The run in {tmp_path} was pretrained with "
                        "data.source='fashion_mnist' (this config: 'folder'), data.path='' "
                        f"(this config: '{tmp_path / 'photos'}') (its config.pretrain.json)")
  assert "give --workdir=" in other_data.stderr
  assert_one_line_error(other_model, "pretrained with model.d_model=32 (this config: 64)")
  assert not (tmp_path / "config.evaluate.json").exists()
  assert longer.returncode == 0, longer.stderr[-2000:]
  assert json.loads(longer.stdout.strip().splitlines()[-1])["step"] == 3
  assert json.loads((tmp_path / "config.pretrain.json").read_text())["model"] == json.loads(
      saved)["model"]


def test_a_checkpoint_is_used_only_with_the_palette_it_was_trained_with(tmp_path):
  """fit_palette keeps the palette that checkpoints were trained with; another palette.npz (a
  file copied over it) is refused in one line by a resumed pretraining, by fine-tuning and by
  evaluation, and the checkpoint is left as it is."""
  from igpt_jax import palette as palette_lib
  from igpt_jax.stages import pretrain as pretrain_stage
  from test_train import tiny_config
  pretrain_stage.run(tiny_config(steps=2), str(tmp_path), log=lambda *_: None)
  palette = tmp_path / "palette.npz"
  trained_with = palette.read_bytes()
  run = (f"--config={REPO}/configs/demo.py", f"--workdir={tmp_path}",
         "--config.data.resolution=8", "--config.model.num_layers=2", "--config.model.d_model=32",
         "--config.model.num_heads=4", "--config.train.batch_size=16",
         "--config.palette.samples=20000", "--config.finetune.head_init=zeros")
  [refit] = cli_many((*run, "--config.stage=fit_palette", "--config.seed=7"))
  assert_one_line_error(refit, "is the palette the checkpoints in")
  assert palette.read_bytes() == trained_with
  centers = palette_lib.Palette.load(str(palette)).centers
  palette.write_bytes(palette_lib.Palette(np.clip(centers[::-1] * 0.9, -1, 1)).to_bytes())
  for out in cli_many((*run, "--config.stage=pretrain", "--config.train.steps=4"),
                      (*run, "--config.stage=finetune"), (*run, "--config.stage=evaluate")):
    assert_one_line_error(out, "was trained with a different palette")
  assert sorted(os.listdir(tmp_path / "checkpoints" / "pretrain")) == ["2"]
  assert not list((tmp_path / "checkpoints").glob("finetune/[0-9]*"))


def test_plan_answers_in_words_for_any_machine(tmp_path):
  """No target: one sentence judges the step against this machine's free RAM or
  plan.device_memory_gb; a step that does not fit gets the search and overrides that fit when
  pasted back; a budget below the model's own state says how many devices it takes; simulated
  devices without a budget say how to get a verdict."""
  demo, w = f"--config={REPO}/configs/demo.py", f"--workdir={tmp_path}"
  plan = lambda *args: cli(demo, "--config.stage=plan", w, *args)
  last_json = lambda out: json.loads(out.stdout.strip().splitlines()[-1])
  here = plan()
  assert here.returncode == 0, here.stderr[-3000:]
  assert "plan: fits this machine's free RAM: " in here.stdout and last_json(here)["fits"]
  needs = last_json(here)["per_device_gib"]
  budget = f"--config.plan.device_memory_gb={0.7 * needs:.4f}"
  tight = plan(budget)
  assert tight.returncode == 0, tight.stderr[-3000:]
  assert f"plan: does NOT fit plan.device_memory_gb={0.7 * needs:.4f}: " in tight.stdout
  result = last_json(tight)
  assert result["fits"] is False and result["suggested"]["fits"], result
  pasted = plan(budget, *result["suggested"]["overrides"].split())
  assert last_json(pasted)["fits"], pasted.stdout[-2000:]
  assert abs(last_json(pasted)["per_device_gib"] - result["suggested"]["per_device_gib"]) < 1e-3
  # AdamW: parameters, gradients and two moments, 16 bytes a parameter, at 2.5x the budget.
  state_gib = 16 * last_json(here)["params"] / 2**30
  hopeless = plan(f"--config.plan.device_memory_gb={state_gib / 2.5:.6f}")
  assert "plan: no setting on 1 device can fit" in hopeless.stdout, hopeless.stdout[-2000:]
  assert "it takes at least 3 devices" in hopeless.stdout
  assert last_json(hopeless)["devices_needed_at_least"] == 3
  simulated = plan("--config.plan.num_devices=2")
  assert "on 2 simulated CPU devices" in simulated.stdout
  assert "--config.plan.device_memory_gb=<GiB per device" in simulated.stdout
  assert "fits" not in last_json(simulated)


def test_plan_simulates_the_devices_a_mesh_needs():
  out = cli(f"--config={REPO}/configs/igpt_xl.py", "--config.stage=plan",
            "--config.mesh.tensor=4", "--workdir=/tmp/igpt_plan_xl_laptop")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "planning on 4 simulated CPU devices" in out.stdout
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["mesh"] == {"data": 1, "fsdp": 1, "tensor": 4}
