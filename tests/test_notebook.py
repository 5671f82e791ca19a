"""launch/colab.ipynb runs top to bottom on CPU with tiny settings."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO, xla_flags
from igpt_jax.data import sources


@pytest.mark.skipif(sources.fashion_mnist_dir() is None,
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_colab_notebook_runs_every_cell(tmp_path, monkeypatch):
  monkeypatch.setenv("IGPT_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("IGPT_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("XLA_FLAGS", xla_flags())
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = nbformat.read(os.path.join(REPO, "launch", "colab.ipynb"), as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises on any error
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= 4  # loss curve, samples, completions, probe accuracy
  assert os.path.exists(tmp_path / "run" / "probe" / "results.json")
