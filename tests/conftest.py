"""Test-wide settings: 8 simulated CPU devices for sharding tests, float32 matmuls everywhere,
one compilation cache for the session."""
import atexit
import os
import shutil
import tempfile


# Tests compile far more than they run: XLA's CPU backend without LLVM's optimisations compiles a
# tiny model's stages ~25% faster, with the same results here (bits/dim equal to the last digit).
# Processes a test starts get the same flags through xla_flags().
CPU_FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int | None = None, fast_compile: bool = True) -> str:
  flags = [CPU_FAST_COMPILE] if fast_compile else []
  flags += [f"--xla_force_host_platform_device_count={devices}"] if devices else []
  return " ".join(flags)


os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# In-process plans compile with the libtpu flags igpt_jax.main gives every run (targets.py).
from igpt_jax import targets as _targets  # noqa: E402
_targets.set_libtpu_flags()

# JAX's persistent compilation cache, shared by this process and every process a test starts
# (they inherit the environment): dozens of them compile the same tiny train step, which halves a
# tiny run's wall time. Fresh per session, so no test reads an executable of another jax version.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="igpt-test-xla-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# In CI (IGPT_STRICT_SKIPS=1, set by .ci/run) a test skipped for want of data or a package the
# project's own set-up installs is a failure: a broken install must not turn the multi-process,
# stage and resume tests into green skips. Skips for what a machine may lack (a GPU, the CUDA
# compiler, root for a mount namespace or a localhost SLURM) stay skips, listed by -rs.
INSTALLED_BY_SETUP = ("dataset-fashion-mnist", "tensorflow", "transformers", "skimage", "libtpu")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  report = outcome.get_result()
  if (report.skipped and os.environ.get("IGPT_STRICT_SKIPS") == "1"
      and any(word in str(report.longrepr) for word in INSTALLED_BY_SETUP)):
    report.outcome = "failed"
    report.longrepr = f"skipped in CI, where the set-up installs what it needs: {report.longrepr}"
