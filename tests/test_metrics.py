"""TensorBoard output: training scalars, sample grids during pretraining, probe accuracy by layer."""
import glob
import os

import pytest

from igpt_jax import probe
from igpt_jax.stages import pretrain as pretrain_stage
from igpt_jax.data import sources
from test_stages import QUIET, stage_config

pytestmark = pytest.mark.skipif(sources.fashion_mnist_dir() is None,
                                reason="Debian's dataset-fashion-mnist is not installed")


def read_events(logdir):
  from tensorboard.backend.event_processing import event_accumulator
  (path,) = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
  acc = event_accumulator.EventAccumulator(path, size_guidance={"images": 0, "scalars": 0})
  acc.Reload()
  return acc


def test_tensorboard_gets_scalars_sample_grids_and_probe_accuracy(tmp_path):
  workdir = str(tmp_path)
  config = stage_config("pretrain")
  config.train.sample_every = 4
  pretrain_stage.run(config, workdir, log=QUIET)
  acc = read_events(os.path.join(workdir, "tensorboard"))
  for tag in ("loss", "bits_per_dim", "lr", "grad_norm", "tokens_per_s"):
    assert [e.step for e in acc.Scalars(tag)] == list(range(1, 9))
  grids = acc.Images("samples")
  assert [e.step for e in grids] == [4, 8]
  # 8 samples of 8x8 in one row with 2-pixel gaps.
  assert (grids[0].height, grids[0].width) == (8 + 4, 8 * 10 + 2)

  probe.run(stage_config("probe"), workdir, log=QUIET)
  acc = read_events(os.path.join(workdir, "probe", "tensorboard"))
  assert [e.step for e in acc.Scalars("probe/accuracy")] == [1, 2]
  assert all(0 < e.value <= 1 for e in acc.Scalars("probe/accuracy"))
  assert len(acc.Images("probe/accuracy_by_layer")) == 1
