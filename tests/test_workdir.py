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


def test_a_finetune_checkpoint_with_another_head_bias_is_refused_by_name():
  """Resuming a head saved with a bias under finetune.head_bias=False (the default since the
  head became the release's) must name the field, not fail in Orbax's tree matching."""
  import dataclasses

  import pytest

  from igpt_jax import checkpoint as checkpoint_lib
  from igpt_jax import model as model_lib
  cfg = model_lib.ModelConfig(num_classes=3, class_bias=False)
  saved = dataclasses.asdict(cfg)
  workdir_lib.check_same_model({"model": saved}, cfg, "w")  # the same head: fine
  del saved["class_bias"]  # a checkpoint from before the field: its head had a bias
  with pytest.raises(checkpoint_lib.CheckpointMismatch,
                     match="finetune.head_bias saved True vs configured False"):
    workdir_lib.check_same_model({"model": saved}, cfg, "w")
