"""Test-wide settings: 8 simulated CPU devices for sharding tests, float32 matmuls everywhere."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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
