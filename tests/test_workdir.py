"""The workdir layout and its paths: local paths made absolute, remote ones kept remote."""
import os

import numpy as np

from igpt_jax import distributed
from igpt_jax import palette as palette_lib
from igpt_jax import workdir as workdir_lib
from test_train import tiny_config


def test_remote_workdir_stays_remote_and_local_one_becomes_absolute(tmp_path, monkeypatch):
  # Before: os.path.abspath turned gs://BUCKET/run into ./gs:/BUCKET/run on every worker.
  assert str(workdir_lib.checkpoint_dir("gs://bucket/run", "pretrain")) == \
      "gs://bucket/run/checkpoints/pretrain"
  assert str(workdir_lib.stage_dir("gs://bucket/run", "finetune")) == "gs://bucket/run/finetune"
  config = tiny_config()
  assert str(workdir_lib.palette_path(config, "gs://bucket/run")) == "gs://bucket/run/palette.npz"
  monkeypatch.chdir(tmp_path)
  assert str(workdir_lib.path("runs/a")) == os.path.join(str(tmp_path), "runs", "a")


def test_only_process_zero_writes_and_writes_are_whole(tmp_path, monkeypatch):
  workdir_lib.write_text(tmp_path / "a" / "report.md", "hello\n")
  assert (tmp_path / "a" / "report.md").read_text() == "hello\n"
  assert os.listdir(tmp_path / "a") == ["report.md"]  # the temporary file was renamed
  workdir_lib.write_text(tmp_path / "a" / "report.md", "again\n")  # replaces
  assert (tmp_path / "a" / "report.md").read_text() == "again\n"
  monkeypatch.setattr(distributed, "is_chief", lambda: False)
  workdir_lib.write_text(tmp_path / "b.md", "from process 1")
  assert not (tmp_path / "b.md").exists()


def test_palette_round_trip_through_epath(tmp_path):
  centers = palette_lib.uniform_grid(16, 1)
  workdir_lib.save_palette(palette_lib.Palette(centers, dataset="x", seed=3), tmp_path / "p" / "palette.npz")
  loaded = palette_lib.Palette.load(tmp_path / "p" / "palette.npz")
  np.testing.assert_array_equal(loaded.centers, centers)
  assert (loaded.dataset, loaded.seed) == ("x", 3)
  assert os.listdir(tmp_path / "p") == ["palette.npz"]
