"""Every shell block that README.md marks `<!-- runnable -->` runs without error.

Demo-config commands get tiny overrides (a 2-layer model, a few steps) and `runs/` points into a
temporary folder; everything else runs as written.
"""
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, xla_flags
from igpt_jax.data import sources

TINY = " ".join([
    "--config.model.num_layers=2", "--config.model.d_model=32", "--config.model.num_heads=4",
    "--config.data.resolution=8",  # 64 tokens an image: the blocks check commands, not models
    "--config.train.steps=4", "--config.train.batch_size=16", "--config.train.log_every=2",
    "--config.train.sample_every=0", "--config.palette.samples=20000", "--config.palette.iters=5",
    "--config.probe.train_examples=300", "--config.probe.test_examples=200",
    "--config.probe.steps=30", "--config.finetune.steps=2", "--config.finetune.eval_every=2",
    "--config.finetune.eval_batches=2", "--config.sample.num=2", "--config.sample.completions=2"])


# What only the test extra installs (`make demo` installs none of it): every README block runs with
# these unimportable, as after `make demo`.
TEST_ONLY = ("torch", "transformers", "sklearn", "skimage", "nbclient")


@pytest.fixture(scope="module")
def without_test_extras(tmp_path_factory):
  """A PYTHONPATH entry that shadows each test-only package with one that fails to import."""
  path = tmp_path_factory.mktemp("without_test_extras")
  for name in TEST_ONLY:
    (path / name).mkdir()
    (path / name / "__init__.py").write_text(
        f"raise ImportError('{name} is installed only by the test extra; make demo has none')\n")
  return str(path)


def runnable_blocks():
  text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
  return re.findall(r"<!-- runnable[^>]*-->\n```bash\n(.*?)```", text, flags=re.S)


def test_readme_marks_the_stage_guide_runnable():
  blocks = runnable_blocks()
  assert len(blocks) >= 4
  assert any("--config.stage=probe" in b for b in blocks)


@pytest.mark.skipif(sources.fashion_mnist_dir() is None,
                    reason="Debian's dataset-fashion-mnist is not installed")
@pytest.mark.parametrize("index", range(len(runnable_blocks())))
def test_readme_block_runs(index, tmp_path, without_test_extras):
  script = runnable_blocks()[index]
  script = script.replace(".venv/bin/python", sys.executable).replace("runs/", f"{tmp_path}/")
  script = re.sub(r"((?:-m igpt_jax\.main|launch/local\.sh [^\n]*--) --config=configs/demo\.py[^\n]*)",
                  rf"\1 {TINY}", script)
  # The stage guide evaluates 26k images: there XLA's optimised code pays (91 s for the block
  # on two devices, vs 139 s compiled fast on one); the other blocks mostly compile.
  computes = "--config.stage=evaluate" in script
  env = {**os.environ, "XLA_FLAGS": xla_flags(2, fast_compile=not computes),
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": without_test_extras}
  out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, f"{script}\n--- stdout\n{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-3000:]}"
