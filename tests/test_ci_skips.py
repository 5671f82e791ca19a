"""In CI a skip for want of what the set-up installs is a failure; a missing GPU stays a skip."""
import os
import shutil
import subprocess
import sys

from conftest import REPO

SKIPPING = '''
import pytest

def test_data():
  pytest.skip("Debian's dataset-fashion-mnist is not installed")

def test_gpu():
  pytest.skip("needs a GPU")
'''


def test_strict_skips_fail_only_in_ci(tmp_path):
  shutil.copy(os.path.join(REPO, "tests", "conftest.py"), tmp_path / "conftest.py")
  (tmp_path / "test_skipping.py").write_text(SKIPPING)
  base = {k: v for k, v in os.environ.items() if k != "IGPT_STRICT_SKIPS"}
  run = lambda env: subprocess.run(  # noqa: E731
      [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  relaxed = run(base)
  assert relaxed.returncode == 0 and "2 skipped" in relaxed.stdout, relaxed.stdout[-2000:]
  strict = run({**base, "IGPT_STRICT_SKIPS": "1"})
  assert strict.returncode == 1, strict.stdout[-2000:]
  assert "1 failed, 1 skipped" in strict.stdout and "skipped in CI" in strict.stdout
