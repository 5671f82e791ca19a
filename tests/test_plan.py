"""Planning with the real TPU compiler (libtpu's compile-only devices of a whole slice, no TPU),
and feeding any TPU device order: every host's rows of a batch, checked on real topologies."""
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from conftest import CPU_FAST_COMPILE, REPO
from igpt_jax import config as config_lib
from igpt_jax import plan as plan_lib
from igpt_jax import plan_compile
from igpt_jax import sharding as sharding_lib
from igpt_jax import targets as targets_lib

pytest.importorskip("libtpu", reason="libtpu (pip install -e .[tpu]) compiles for TPU targets")
# libtpu's runtime threads stay in the process that loads it: `make test` runs these tests in a
# pytest process of their own (pytest.ini), apart from the CPU runtime's.
pytestmark = pytest.mark.own_process


@pytest.fixture(scope="module", autouse=True)
def full_optimisation():
  """The TPU compiler reads XLA_FLAGS too: its memory figures here are those of full optimisation,
  as users compile (conftest's fast-compile flag is for the CPU backend's tiny steps)."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("XLA_FLAGS", os.environ["XLA_FLAGS"].replace(CPU_FAST_COMPILE, "").strip())
    # ... and at the default matmul precision, as users compile (conftest asks for 'highest'
    # for the CPU tests' numerics; the splash kernel compiles at the default only).
    with jax.default_matmul_precision(None):
      yield


def config_of(name: str, **overrides):
  config = config_lib.load_config_file(f"{REPO}/configs/{name}.py")
  with config.unlocked():
    for key, value in overrides.items():
      section, field = key.split(".")
      config[section][field] = value
  return config


def cli(*args, timeout=900):
  env = {k: v for k, v in os.environ.items() if k != "LIBTPU_INIT_ARGS"}  # main sets its own
  proc = subprocess.run([sys.executable, "-m", "igpt_jax.main", *args, "--workdir=/tmp/igpt_plan"],
                        capture_output=True, text=True, cwd=REPO, timeout=timeout, env=env)
  return proc


# -- accelerator names ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,chips,topology", [
    ("v4-32", 16, "v4:2x2x4"), ("v5litepod-64", 64, "v5e:8x8"), ("v5e-16", 16, "v5e:4x4"),
    ("v5p-128", 64, "v5p:4x4x4"), ("v5p-256", 128, "v5p:4x4x8"), ("v6e-64", 64, "v6e:8x8")])
def test_gcloud_names_map_to_topologies(name, chips, topology):
  target = targets_lib.parse(name)
  assert (target.chips, target.topology) == (chips, topology)
  devices = targets_lib.topology_devices(target)
  assert len(devices) == chips
  assert targets_lib.hosts(devices) == chips // 4  # 4 chips per host on multi-host slices


@pytest.mark.parametrize("bad", ["v5litepod-48", "v5p-3", "tpu-64", "v7-8"])
def test_unknown_targets_are_one_line_user_errors(bad):
  with pytest.raises(config_lib.UserError, match="plan.target"):
    targets_lib.parse(bad)


# -- device order --------------------------------------------------------------------------------

MESHES = [dict(data=-1, fsdp=1, tensor=1), dict(data=1, fsdp=-1, tensor=1),
          dict(data=1, fsdp=-1, tensor=4), dict(data=2, fsdp=-1, tensor=8)]


@pytest.mark.parametrize("name", ["v5litepod-16", "v5litepod-64", "v5p-128"])
def test_every_host_feeds_exactly_the_rows_its_devices_hold(name):
  devices = targets_lib.topology_devices(targets_lib.parse(name))
  hosts = targets_lib.hosts(devices)
  saw_non_contiguous = False
  for sizes in MESHES:
    mesh = sharding_lib.make_mesh(ml_collections.ConfigDict(sizes), devices)
    rules, batch = sharding_lib.DEFAULT_RULES, 2 * sharding_lib.batch_shards(mesh)
    sharding = sharding_lib.batch_sharding(mesh, rules, 2)
    copies = np.zeros(batch, int)
    for process in range(hosts):
      rows = sharding_lib.host_rows(mesh, rules, batch, process_index=process)
      saw_non_contiguous |= bool(rows[-1] - rows[0] + 1 != len(rows))
      # What this host's input pipeline would feed: the global batch's rows `rows`, in order.
      global_batch = np.arange(batch * 3).reshape(batch, 3)
      local = global_batch[rows]
      for device, index in sharding.devices_indices_map((batch, 3)).items():
        if device.process_index != process:
          continue
        part = sharding_lib.device_part(local, rows, index, batch)
        np.testing.assert_array_equal(part, global_batch[index])  # the block the device holds
        copies[index[0]] += 1
    replicas = len(devices) // sharding_lib.batch_shards(mesh)
    assert np.all(copies == replicas), (sizes, copies)  # every row, once per replica
    assert sharding_lib.check_row_assignment(mesh, rules, batch)["checked"]
  assert saw_non_contiguous  # the device order this test is about does occur


def test_a_host_that_feeds_the_wrong_rows_is_caught():
  devices = targets_lib.topology_devices(targets_lib.parse("v5litepod-16"))
  mesh = sharding_lib.make_mesh(ml_collections.ConfigDict(MESHES[0]), devices)
  sharding = sharding_lib.batch_sharding(mesh, sharding_lib.DEFAULT_RULES, 1)
  rows = sharding_lib.host_rows(mesh, sharding_lib.DEFAULT_RULES, 32, process_index=0)
  contiguous_guess = np.arange(len(rows))  # what [lo, hi) feeding assumed
  index = next(i for d, i in sharding.devices_indices_map((32,)).items()
               if d.process_index == 0 and i[0].start not in contiguous_guess)
  with pytest.raises(ValueError, match="does not feed"):
    sharding_lib.device_part(np.zeros(len(rows)), contiguous_guess, index, 32)


# -- plan with the TPU compiler ------------------------------------------------------------------

SHIPPED = [("igpt_s", "v5litepod-16", 4), ("igpt_m", "v5litepod-32", 8),
           ("igpt_xl", "v5p-256", 32)]  # igpt_l: through the CLI below


@pytest.mark.parametrize("name,target,hosts", SHIPPED, ids=[s[0] for s in SHIPPED])
def test_each_config_fits_its_reference_slice_as_shipped(name, target, hosts):
  config = config_of(name, **{"plan.target": target, "plan.search": False,
                              "plan.roofline": False})
  assert target in open(f"{REPO}/configs/{name}.py").read()  # the docstring names it
  out = plan_lib.run(config, log=lambda _: None)
  assert out["fits"], out
  assert out["hosts"] == hosts and out["compiler"].startswith("libtpu")
  assert out["per_device_bytes"] <= out["hbm_bytes"]
  assert out["rows"]["checked"] and out["rows"]["hosts"] == hosts
  assert out["attention"] == "splash (auto on tpu)"  # the shipped default, resolved for a TPU


def test_splash_kernel_flops_are_added_to_the_compilers():
  """XLA's cost analysis counts no FLOPs inside a Pallas kernel; the plan finds each splash call
  in the compiled twins and adds its matmuls. A narrow iGPT-S (d=128, 2 heads) of 2 layers at
  16x16 (256 tokens, one 256-token tile), batch 128 over 16 chips: 8 images per chip."""
  config = config_of("igpt_s", **{"plan.target": "v5litepod-16", "plan.search": False,
                                  "data.resolution": 16, "model.d_model": 128,
                                  "model.num_heads": 2, "model.num_layers": 2})
  out = plan_lib.run(config, log=lambda _: None)
  assert out["attention"] == "splash (auto on tpu)" and out["fits"]
  # Per layer and chip: forward 2, dq 3, dkv 4 matmuls of [256, 64] x [64, 256] per image and
  # head; one tile covers the whole causal mask (fraction 1).
  per_matmul = 2 * 8 * 2 * 256 * 256 * 64
  assert out["kernel_flops_per_device"] == 2 * 9 * per_matmul
  ratio = out["counted_over_model_flops"]
  assert 1.0 <= ratio < 1.6 and not out["flops_undercounted"], ratio
  # Without the kernels' FLOPs the compiler's own count falls below the model's.
  assert out["compiler_flops_per_device"] * out["chips"] < out["model_flops_per_step"]
  step_s = config.train.batch_size * 256 / out["tokens_per_s_roofline"]
  assert out["run_hours"] == pytest.approx(config.train.steps * step_s / 3600, rel=1e-3)
  assert out["chip_hours"] == pytest.approx(out["run_hours"] * 16, rel=1e-3)


def test_roofline_from_the_compilers_flops_and_bytes():
  """A narrow iGPT-S (d=128) of 2 and 4 layers at 8x8: the step's FLOPs come from unrolled 1- and
  2-layer twins (XLA counts a scanned layer once), so they grow with depth like the model's count."""
  narrow = {"plan.target": "v5litepod-16", "plan.search": False, "data.resolution": 8,
            "model.d_model": 128, "model.num_heads": 2}
  outs = [plan_lib.run(config_of("igpt_s", **narrow, **{"model.num_layers": n}), log=lambda _: None)
          for n in (2, 4)]
  for out in outs:
    assert out["fits"] and 0 < out["mfu_roofline"] < 1 and out["step_s_roofline"] > 0
    # XLA's own FLOP count of the step is the model's 6N + attention count and a little more
    # (softmax, norms, the optimizer): 1.09x here.
    ratio = out["compiler_flops_per_device"] * out["chips"] / out["model_flops_per_step"]
    assert 1.0 <= ratio < 1.25, ratio
  model_growth = outs[1]["model_flops_per_step"] / outs[0]["model_flops_per_step"]
  compiler_growth = outs[1]["compiler_flops_per_device"] / outs[0]["compiler_flops_per_device"]
  assert abs(compiler_growth / model_growth - 1) < 0.02, (compiler_growth, model_growth)


def test_readme_recipe_fits_its_slice_through_the_cli():
  proc = cli("--config=configs/igpt_l.py", "--config.stage=plan",
             "--config.plan.target=v5litepod-64", "--config.plan.search=false",
             "--config.plan.roofline=false")
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["fits"] and out["hosts"] == 16 and out["chips"] == 64
  assert "v5litepod-64" in open(f"{REPO}/configs/igpt_l.py").read()
  readme = open(f"{REPO}/README.md").read()  # the README's "Plan your pod" command is this one
  assert ("--config=configs/igpt_l.py --config.stage=plan \\\n    --config.plan.target=v5litepod-64"
          in readme)
  assert "WARNING" not in proc.stderr  # libtpu told there is no TPU VM to look for
  assert out["attention"] == "splash (auto on tpu)"
  # The plan compiled with the libtpu flags a TPU run gets from igpt_jax.main.
  assert out["libtpu_flags"] == " ".join(targets_lib.LIBTPU_FLAGS)


def test_a_step_that_does_not_fit_is_reported_with_overrides_that_do():
  """XLA's attention, pure data parallelism, no remat, 8 rows per chip at once: the compiler's
  RESOURCE_EXHAUSTED is the answer fits: false (exit 0), with overrides that fit when pasted
  back (the fused kernel first: the search tries splash before any other change)."""
  proc = cli("--config=configs/igpt_s.py", "--config.stage=plan", "--config.plan.target=v5litepod-16",
             "--config.mesh.data=-1", "--config.mesh.fsdp=1", "--config.model.remat=none",
             "--config.train.accum_steps=1", "--config.plan.roofline=false",
             "--config.model.attention=xla")
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["fits"] is False and "RESOURCE_EXHAUSTED" in out["out_of_memory"]
  suggested = out["suggested"]
  assert suggested["fits"] and "--config.model.attention=splash" in suggested["overrides"]
  overrides = suggested["overrides"].split() + ["--config.plan.search=false",
                                                "--config.plan.roofline=false"]
  proc = cli("--config=configs/igpt_s.py", "--config.stage=plan",
             "--config.plan.target=v5litepod-16", "--config.mesh.data=-1",
             "--config.mesh.fsdp=1", "--config.model.remat=none", "--config.model.attention=xla",
             *overrides)
  again = json.loads(proc.stdout.strip().splitlines()[-1])
  assert again["fits"] and abs(again["per_device_gib"] - suggested["per_device_gib"]) < 1e-3


def test_multislice_compiles_for_two_slices():
  config = config_of("igpt_s", **{"plan.target": "v5litepod-16", "plan.slices": 2,
                                  "plan.search": False, "plan.roofline": False,
                                  "model.num_layers": 2, "model.d_model": 128,
                                  "model.num_heads": 2, "data.resolution": 8})
  out = plan_lib.run(config, log=lambda _: None)
  assert (out["slices"], out["chips"], out["hosts"]) == (2, 32, 8)
  assert out["fits"] and out["mesh"]["data"] == 2 * 16
  devices = targets_lib.topology_devices(targets_lib.parse("v5litepod-16"), slices=2)
  mesh = sharding_lib.make_mesh(ml_collections.ConfigDict(
      dict(data=-1, fsdp=1, tensor=1, slices=2)), devices)
  # Data parallel across slices: each half of the data axis is one slice.
  slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  assert set(slice_of[:16].ravel()) == {0} and set(slice_of[16:].ravel()) == {1}


def test_gpu_targets_are_labelled_cpu_estimates():
  proc = cli("--config=configs/demo.py", "--config.stage=plan", "--config.plan.target=h100-2")
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["compiler"] == "cpu-estimate" and out["chips"] == 2 and out["fits"]


def test_a_typo_in_the_target_is_one_line():
  proc = cli("--config=configs/igpt_s.py", "--config.stage=plan", "--config.plan.target=v5lite-16")
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["v4-8", "v5litepod-4", "v5p-8", "v6e-4"])
def test_fits_are_judged_against_the_compilers_own_hbm_limit(name):
  """A program far too big for one chip: libtpu's refusal states the HBM it lets a program use
  ("exceeds available HBM (15.75G)" on v5e), the limit `plan` must judge fits against -- not the
  chip's nominal 16 GiB."""
  import re
  import jax.numpy as jnp
  target = targets_lib.parse(name)
  device = targets_lib.topology_devices(target)[0]
  mesh = jax.sharding.Mesh(np.asarray([device]), ("x",))
  whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  huge = jax.ShapeDtypeStruct((50 * 2**20, 1024), jnp.float32, sharding=whole)  # 200 GiB
  step = jax.jit(lambda x: jnp.cumsum(x * 2.0, axis=0)[::2].sum(), in_shardings=whole,
                 out_shardings=whole)
  with pytest.raises(Exception, match="RESOURCE_EXHAUSTED") as refusal:
    step.lower(huge).compile()
  limit = float(re.search(r"available HBM \(([\d.]+)G\)", str(refusal.value)).group(1))
  assert round(target.usable_bytes / 2**30, 2) == limit


def test_a_mesh_that_does_not_divide_a_dimension_says_so():
  """24 heads on tensor=16 (a hand-set mesh): those weights stay whole on every device of the
  axis; the plan's JSON and log say so in one line instead of multiplying memory silently."""
  config = config_of("igpt_l", **{"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 16,
                                  "model.num_heads": 24})
  mesh = sharding_lib.make_mesh(config.mesh, targets_lib.topology_devices(
      targets_lib.parse("v5litepod-16")))
  why = plan_compile.undivided(config, mesh)
  assert why.startswith("the mesh does not divide heads (24) by mesh.tensor=16"), why
  assert "choose mesh sizes that divide them" in why
  assert plan_compile.undivided(config_of("igpt_l", **{"mesh.tensor": 8}), sharding_lib.make_mesh(
      config_of("igpt_l", **{"mesh.tensor": 8}).mesh, targets_lib.topology_devices(
          targets_lib.parse("v5litepod-16")))) == ""
