"""TensorBoard output: training scalars, sample grids during pretraining, probe accuracy by layer."""
import glob
import os

import pytest

from igpt_jax import metrics, probe
from igpt_jax.stages import finetune as finetune_stage
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
    assert [e.step for e in acc.Scalars(f"pretrain/{tag}")] == list(range(1, 9))
  assert all(tag.startswith("pretrain/") for tag in acc.Tags()["scalars"])
  grids = acc.Images("pretrain/samples")
  assert [e.step for e in grids] == [4, 8]
  # 8 samples of 8x8 in one row with 2-pixel gaps.
  assert (grids[0].height, grids[0].width) == (8 + 4, 8 * 10 + 2)

  # Fine-tuning's curves are its own cards (not pretraining's `loss` overlaid), and the count
  # of examples evaluated is text at the evaluations, not a curve.
  config = stage_config("finetune")
  config.finetune.eval_every = 2  # evaluations at steps 0 (the LP-FT head), 2 and 4: same examples
  finetune_stage.run(config, workdir, log=QUIET)
  acc = read_events(os.path.join(workdir, "finetune", "tensorboard"))
  scalars = acc.Tags()["scalars"]
  assert "finetune/loss" in scalars and "finetune/eval_accuracy" in scalars
  assert all(tag.startswith("finetune/") for tag in scalars)
  assert not any(tag.endswith("_examples") for tag in scalars)
  rows = [r for r in metrics.read_rows(os.path.join(workdir, "finetune")) if "eval_examples" in r]
  assert [r["step"] for r in rows] == [0, 2, 4] and rows[0]["eval_examples"] > 0
  (text,) = acc.Tensors("finetune/eval_examples")  # written once: the count never changed
  assert acc.SummaryMetadata("finetune/eval_examples").plugin_data.plugin_name == "text"
  assert text.step == rows[0]["step"]
  assert text.tensor_proto.string_val == [str(int(rows[0]["eval_examples"])).encode()]

  probe.run(stage_config("probe"), workdir, log=QUIET)
  acc = read_events(os.path.join(workdir, "probe", "tensorboard"))
  assert [e.step for e in acc.Scalars("probe/accuracy")] == [1, 2]
  assert all(0 < e.value <= 1 for e in acc.Scalars("probe/accuracy"))
  assert len(acc.Images("probe/accuracy_by_layer")) == 1


class ObjectStore:
  """A gs:// bucket on this machine for etils/fsspec (a local folder under `root`): counts the
  bytes written and, as an object store, refuses appends."""

  def __init__(self, root):
    from fsspec.implementations.local import LocalFileSystem
    store = self

    class Bucket(LocalFileSystem):
      protocol = ("gs", "gcs")

      def __init__(self, *args, finalize_on_close=None, **kwargs):
        super().__init__(*args, **kwargs)

      @classmethod
      def _strip_protocol(cls, path):
        path = str(path)
        for prefix in ("gs://", "gcs://"):
          path = path.removeprefix(prefix)
        path = path if path.startswith(str(root)) else os.path.join(str(root), path.lstrip("/"))
        return LocalFileSystem._strip_protocol(path)

      def glob(self, path, **kwargs):  # bucket paths, as a bucket lists them
        return [p.removeprefix(f"{root}/") for p in super().glob(path, **kwargs)]

      def _open(self, path, mode="rb", **kwargs):
        assert "a" not in mode, f"an object store cannot append ({path})"
        f = super()._open(path, mode, **kwargs)
        if "w" in mode:
          write = f.write
          def counted(data):
            store.bytes_written += len(data)
            return write(data)
          f.write = counted
        return f

    self.bytes_written, self.filesystem = 0, Bucket


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  import importlib

  from etils.epath import backend
  registry = importlib.import_module("fsspec.registry")._registry  # (a read-only view outside)
  store = ObjectStore(tmp_path / "bucket")
  from etils.epath import gpath
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # etils' fsspec backend
  for protocol in ("gs", "gcs"):
    monkeypatch.setitem(registry, protocol, store.filesystem)
  backend.fsspec_backend._get_filesystem.cache_clear()
  yield store
  backend.fsspec_backend._get_filesystem.cache_clear()


def test_metrics_on_an_object_store_grow_by_parts_written_once(bucket, tmp_path):
  """metrics.jsonl and TensorBoard events on gs://: the bytes written over a run grow linearly
  with its logged steps (a rewrite of the whole file at each log step grows quadratically),
  nothing is appended, and every row and point reads back -- also after a killed run."""
  from tensorboard.backend.event_processing import event_file_loader

  from igpt_jax import metrics

  def log_steps(run: str, steps: int, **kwargs) -> int:
    bucket.bytes_written = 0
    writer = metrics.MetricsWriter(f"gs://b/{run}", **kwargs)
    writer.truncate_after(0)
    for step in range(1, steps + 1):
      writer.write(step, {"loss": 1.0 / step, "tokens_per_s": 1e5, "lr": 1e-3})
    writer.close()
    return bucket.bytes_written

  short, long = log_steps("short", 100), log_steps("long", 200)
  assert 1.8 < long / short < 2.2, (short, long)  # linear (quadratic: ~4)
  short, long = log_steps("short", 100, flush_s=0), log_steps("long", 200, flush_s=0)
  assert 1.8 < long / short < 2.2, (short, long)  # and with a part per row, the worst case
  assert [r["step"] for r in metrics.read_rows("gs://b/long")] == list(range(1, 201))
  events = sorted((tmp_path / "bucket" / "b" / "long" / "tensorboard").iterdir())
  steps = [e.step for path in events for e in event_file_loader.EventFileLoader(str(path)).Load()
           if any(v.tag == "loss" for v in e.summary.value)]
  assert steps == list(range(1, 201))
  # Closed: one file again. Killed (never closed): its parts are read, then folded in.
  assert not (tmp_path / "bucket" / "b" / "long" / "metrics.jsonl.parts").exists() or not list(
      (tmp_path / "bucket" / "b" / "long" / "metrics.jsonl.parts").iterdir())
  killed = metrics.MetricsWriter("gs://b/killed", flush_s=0)
  for step in range(1, 31):
    killed.write(step, {"loss": 1.0 / step})
  killed.wait()  # written, never closed
  assert [r["step"] for r in metrics.read_rows("gs://b/killed")] == list(range(1, 31))
  resumed = metrics.MetricsWriter("gs://b/killed")
  resumed.truncate_after(20)
  resumed.close()
  assert [r["step"] for r in metrics.read_rows("gs://b/killed")] == list(range(1, 21))
