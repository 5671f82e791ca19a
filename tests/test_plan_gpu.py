"""GPU targets compiled by XLA's CUDA compiler without a GPU: runs where jax's CUDA plugin is
installed (`pip install -e .[gpu-plan]`, several GB, so not in `make test`); elsewhere GPU
targets are CPU estimates, tested in tests/test_plan.py."""
import pytest

from conftest import REPO
from igpt_jax import config as config_lib
from igpt_jax import plan as plan_lib
from igpt_jax import targets as targets_lib

pytestmark = [pytest.mark.skipif(not targets_lib.has_cuda_compiler(),
                                 reason="jax's CUDA plugin (.[gpu-plan]) is not installed"),
              pytest.mark.own_process]  # the CUDA plugin's runtime, like libtpu's (test_plan.py)


def test_cuda_compiler_matches_a_measured_h100_step():
  """iGPT-M, bf16, XLA attention, remat dots, batch 32 on one H100: 30.5 GiB measured
  (benchmarks/RESULTS.md, 2026-11-22); the CPU compiler's estimate is 56.6 GiB."""
  config = config_lib.load_config_file(f"{REPO}/configs/igpt_m.py")
  with config.unlocked():
    config.plan.target, config.plan.search, config.plan.roofline = "h100", False, False
    config.train.batch_size, config.train.accum_steps = 32, 1
    config.model.remat = "dots_with_no_batch_dims_saveable"
  out = plan_lib.run(config, log=lambda _: None)
  assert out["compiler"].startswith("xla-cuda")
  assert abs(out["per_device_gib"] / 30.5 - 1) < 0.15, out["per_device_gib"]
  assert out["fits"]


def test_eight_gpus_per_host():
  devices = targets_lib.gpu_devices(targets_lib.parse("h100-16"))
  assert len(devices) == 16 and targets_lib.hosts(devices) == 2
