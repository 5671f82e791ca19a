"""What `make test` installs: torch as PyTorch's CPU build, pinned once (setup.py)."""
import re
import subprocess

from conftest import REPO


def test_make_test_installs_the_pinned_torch_from_the_cpu_index_before_the_test_extra():
  setup = open(f"{REPO}/setup.py").read()
  pin = re.search(r'^TORCH_PIN = "(torch==[^"]+)"', setup, flags=re.M).group(1)
  assert "TORCH_PIN,  #" in setup  # the test extra requires the same pin
  # -n: print the commands only; -W: as if the package install had just changed.
  out = subprocess.run(["make", "-n", "-W", ".venv/.installed", ".venv/.installed-test"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  torch = [i for i, line in enumerate(lines) if line.endswith(f'"{pin}"')]
  extra = [i for i, line in enumerate(lines) if line.endswith('-m pip install --quiet -e ".[test]"')]
  assert len(torch) == 1 and len(extra) == 1 and torch[0] < extra[0], out.stdout
  assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines[torch[0]]
