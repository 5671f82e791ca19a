"""Prepared data sets: the prepare stage (folder with a corrupt file, numpy, TFDS's real
download-and-prepare path), resume after a kill, lazy per-host reads, validation split,
bounded memory and the TensorFlow-free input path."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from igpt_jax import config as config_lib
from igpt_jax import palette as P
from igpt_jax.data import pipeline, prepared, sources, transform
from igpt_jax.data.sources import folder as folder_source
from igpt_jax.stages import prepare

QUIET = lambda *_: None
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RGB8 = P.uniform_grid(8, 3)


def config_for(source, path, out, resolution=8, shard_size=16, **data):
  c = config_lib.base_config()
  c.data.source, c.data.path, c.data.prepared = source, str(path), str(out)
  c.data.resolution, c.data.shard_size, c.data.workers = resolution, shard_size, 2
  for k, v in data.items():
    c.data[k] = v
  return c


def as_prepared(config):
  config.data.source = "prepared"
  return config


def write_numpy_source(path, n_train=100, n_test=20, side=12, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  arrays = {"train_images": rng.integers(0, 256, (n_train, side, side, channels), np.uint8),
            "train_labels": rng.integers(0, 5, n_train),
            "test_images": rng.integers(0, 256, (n_test, side, side, channels), np.uint8),
            "test_labels": rng.integers(0, 5, n_test)}
  np.savez(path, **arrays)
  return arrays


def test_prepared_numpy_reads_back_identical_pixels(tmp_path):
  arrays = write_numpy_source(tmp_path / "src.npz")
  config = config_for("numpy", tmp_path / "src.npz", tmp_path / "prep", validation_fraction=0.0)
  result = prepare.run(config, log=QUIET)
  assert result["examples"] == {"train": 100, "test": 20} and not result["full_size"]
  config = as_prepared(config)
  for split in ("train", "test"):
    data = sources.load(config, split)
    np.testing.assert_array_equal(data.images[np.arange(len(data))], arrays[f"{split}_images"])
    np.testing.assert_array_equal(data.labels, arrays[f"{split}_labels"])
    idx = np.array([99 if split == "train" else 19, 0, 17, 16, 15])  # across shard borders
    np.testing.assert_array_equal(data.images[idx], arrays[f"{split}_images"][idx])
  assert prepared.verify(config.data.prepared) == []
  with open(os.path.join(config.data.prepared, "train-00001.images"), "r+b") as f:
    f.write(b"\x00\x01\x02")  # damage: the checksum names the shard
  assert prepared.verify(config.data.prepared) == ["train-00001"]


def test_prepared_folder_skips_the_corrupt_file_and_matches_the_in_memory_loader(tmp_path):
  rng = np.random.default_rng(1)
  for cls in ("cats", "dogs"):
    (tmp_path / "src" / cls).mkdir(parents=True)
    for i in range(12):
      h, w = rng.integers(20, 50, 2)
      Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(tmp_path / f"src/{cls}/{i}.png")
  good = (tmp_path / "src/dogs/0.png").read_bytes()
  (tmp_path / "src/dogs/corrupt.png").write_bytes(good[:60])
  config = config_for("folder", tmp_path / "src", tmp_path / "prep", shard_size=5)
  logs = []
  result = prepare.run(config, log=logs.append)
  assert result["full_size"] and result["side"] == 16  # storage side: 2 x resolution
  assert sum(result["skipped"].values()) == 1
  assert any("corrupt.png" in line for line in logs)
  assert any("images/s" in line and "ETA" in line for line in logs)
  manifest = prepared.read_manifest(config.data.prepared)
  split = "train" if manifest["splits"]["train"]["skipped"] else "test"
  assert manifest["splits"][split]["skipped"][0].endswith("corrupt.png")
  for role in ("train", "test"):
    in_memory = folder_source.load_folder(str(tmp_path / "src"), role, 3, 8, log=QUIET)
    data = sources.load_split(as_prepared(config_for("folder", "", config.data.prepared)), role)
    assert data.full_size and data.class_names == ["cats", "dogs"]
    np.testing.assert_array_equal(data.images[np.arange(len(data))], in_memory.images)
    np.testing.assert_array_equal(data.labels, in_memory.labels)


def test_prepare_refuses_without_a_destination(tmp_path):
  config = config_for("numpy", tmp_path / "src.npz", "")
  with pytest.raises(sources.DataError, match="data.prepared"):
    prepare.run(config, log=QUIET)
  with pytest.raises(config_lib.UserError, match="run `--config.stage=prepare`"):
    sources.load(as_prepared(config_for("numpy", "", tmp_path / "nothing")), "train")


SLOW_PREPARE = """
import sys, time
from igpt_jax.data import prepared
from igpt_jax.stages import prepare
from igpt_jax import config as config_lib
write = prepared.write_shard
def slow(*args, **kwargs):
  out = write(*args, **kwargs)
  time.sleep(0.5)
  return out
prepared.write_shard = slow
c = config_lib.base_config()
c.data.source, c.data.path, c.data.prepared = "numpy", sys.argv[1], sys.argv[2]
c.data.resolution, c.data.shard_size, c.data.workers = 8, 10, 1
prepare.run(c)
"""


def test_killed_prepare_resumes_to_the_same_manifest(tmp_path):
  write_numpy_source(tmp_path / "src.npz", n_train=100, n_test=20)
  whole, resumed = tmp_path / "whole", tmp_path / "resumed"
  prepare.run(config_for("numpy", tmp_path / "src.npz", whole, shard_size=10), log=QUIET)
  proc = subprocess.Popen([sys.executable, "-c", SLOW_PREPARE, str(tmp_path / "src.npz"),
                           str(resumed)], cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while len(list(resumed.glob("*.done.json"))) < 3 and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done_before = len(list(resumed.glob("*.done.json")))
  assert 3 <= done_before < 12 and not (resumed / prepared.MANIFEST).exists()
  logs = []
  prepare.run(config_for("numpy", tmp_path / "src.npz", resumed, shard_size=10), log=logs.append)
  assert sum("already prepared" in line for line in logs) >= 1
  assert sum("shard" in line and "images/s" in line for line in logs) == 12 - done_before
  assert (json.loads((resumed / prepared.MANIFEST).read_text())
          == json.loads((whole / prepared.MANIFEST).read_text()))


def directory_state(directory) -> dict:
  return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_prepare_resumes_only_with_the_same_settings(tmp_path):
  write_numpy_source(tmp_path / "src.npz", n_train=100, n_test=20)
  src, prep = tmp_path / "src.npz", tmp_path / "prep"
  prepare.run(config_for("numpy", src, prep, shard_size=10), log=QUIET)
  before = directory_state(prep)
  assert json.loads(before["prepare.json"])["shard_size"] == 10
  with pytest.raises(sources.DataError, match="other settings \\(shard_size 10 there vs 16 now\\); "
                     "nothing was changed"):
    prepare.run(config_for("numpy", src, prep, shard_size=16), log=QUIET)
  with pytest.raises(sources.DataError, match="channels 3 there vs 1 now"):
    prepare.run(config_for("numpy", src, prep, shard_size=10, channels=1), log=QUIET)
  assert directory_state(prep) == before
  # A damaged shard of a matching set is written again on resume; the rest are kept.
  with open(prep / "train-00003.images", "r+b") as f:
    f.truncate(100)
  logs = []
  prepare.run(config_for("numpy", src, prep, shard_size=10), log=logs.append)
  assert [line.split(",")[0] for line in logs if "images/s" in line] == ["train: shard 4/10"]
  assert directory_state(prep) == before
  # overwrite starts over: the old set's files are gone, the result is a fresh set's.
  prepare.run(config_for("numpy", src, prep, shard_size=16, overwrite=True), log=QUIET)
  prepare.run(config_for("numpy", src, tmp_path / "fresh", shard_size=16), log=QUIET)
  assert directory_state(prep) == directory_state(tmp_path / "fresh")
  assert not (prep / "train-00009.images").exists()


def test_prepare_refuses_shards_of_unknown_settings(tmp_path):
  write_numpy_source(tmp_path / "src.npz", n_train=30, n_test=10)
  (tmp_path / "prep").mkdir()
  (tmp_path / "prep" / "train-00000.images").write_bytes(b"old")
  (tmp_path / "prep" / "notes.txt").write_text("mine")
  with pytest.raises(sources.DataError, match="unknown settings"):
    prepare.run(config_for("numpy", tmp_path / "src.npz", tmp_path / "prep"), log=QUIET)
  prepare.run(config_for("numpy", tmp_path / "src.npz", tmp_path / "prep", overwrite=True),
              log=QUIET)
  assert (tmp_path / "prep" / "notes.txt").read_text() == "mine"  # only the set's files go
  assert len(sources.load(as_prepared(config_for("numpy", "", tmp_path / "prep")), "test")) == 10


def test_prepare_with_other_settings_is_one_error_line_on_the_cli(tmp_path):
  write_numpy_source(tmp_path / "src.npz", n_train=30, n_test=10)
  args = [sys.executable, "-m", "igpt_jax.main", "--config=configs/demo.py",
          "--config.stage=prepare", "--config.data.source=numpy",
          f"--config.data.path={tmp_path / 'src.npz'}", f"--config.data.prepared={tmp_path / 'p'}"]
  first = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert first.returncode == 0, first.stderr[-2000:]
  again = subprocess.run(args + ["--config.data.shard_size=7"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
  assert again.returncode == 2
  assert again.stderr.strip().splitlines() == [again.stderr.strip()]
  assert again.stderr.startswith("error: ") and "shard_size 10000 there vs 7 now" in again.stderr


def test_a_write_error_is_one_line_leaves_no_partial_file_and_resumes(tmp_path):
  """A real write failure from the OS (the file size limit: EFBIG, as a full disk gives
  ENOSPC) in the middle of a shard."""
  write_numpy_source(tmp_path / "src.npz", n_train=100, n_test=20)
  args = [sys.executable, "-m", "igpt_jax.main", "--config=configs/demo.py",
          "--config.stage=prepare", "--config.data.source=numpy", "--config.data.shard_size=40",
          f"--config.data.path={tmp_path / 'src.npz'}", f"--config.data.prepared={tmp_path / 'p'}"]
  limit = 40 * 12 * 12 - 1  # one byte short of a shard of 40 gray 12x12 rows
  limited = [sys.executable, "-c", "import os, resource, sys; resource.setrlimit(resource."
             f"RLIMIT_FSIZE, ({limit}, {limit})); os.execv(sys.executable, sys.argv[1:])", *args]
  proc = subprocess.run(limited, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.startswith("error: Preparing ") and "File too large" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
  assert not [p.name for p in (tmp_path / "p").iterdir() if p.name.endswith(".tmp")]
  assert not (tmp_path / "p" / "train-00000.done.json").exists()
  again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-2000:]
  fresh = subprocess.run(args[:-1] + [f"--config.data.prepared={tmp_path / 'fresh'}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
  assert fresh.returncode == 0
  assert directory_state(tmp_path / "p") == directory_state(tmp_path / "fresh")


@pytest.fixture(scope="module")
def prepared_set(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("prepared")
  write_numpy_source(tmp / "src.npz", n_train=200, n_test=30, side=16)
  config = config_for("numpy", tmp / "src.npz", tmp / "prep", shard_size=32)
  prepare.run(config, log=QUIET)
  return as_prepared(config)


def test_validation_split_is_disjoint_and_deterministic(prepared_set):
  config = prepared_set
  assert sources.validation_fraction(config) == 0.1  # not ImageNet: the paper's CIFAR 10%
  train, validation = sources.load(config, "train"), sources.load(config, "validation")
  pretrain, test = sources.load(config, "pretrain"), sources.load(config, "test")
  assert len(train) == 180 and len(validation) == 20 and len(test) == 30
  whole = sources.load_split(config, "train")
  rows = lambda d: {bytes(x) for x in d.images[np.arange(len(d))].reshape(len(d), -1)}
  assert not rows(train) & rows(validation) and not rows(validation) & rows(test)
  assert rows(train) | rows(validation) == rows(whole) and rows(pretrain) == rows(train)
  again = sources.load(config, "validation")
  np.testing.assert_array_equal(again.images[np.arange(20)], validation.images[np.arange(20)])
  # The run's seed does not move it: a probe or fine-tune with another seed still validates on
  # images its model was not pretrained on.
  config.seed = 1
  other, other_train = sources.load(config, "validation"), sources.load(config, "pretrain")
  config.seed = 0
  assert rows(other) == rows(validation) and rows(other_train) == rows(train)
  # A different split seed is a different split (the choice is a real draw, not a fixed slice).
  _, moved = sources.holdout(len(whole), 0.1, seed=1)
  assert rows(whole.subset(moved, "moved")) != rows(validation)


def copy_of(prepared_set, tmp_path):
  import copy
  import shutil
  config = copy.deepcopy(prepared_set)
  shutil.copytree(config.data.prepared, tmp_path / "copy")
  config.data.prepared = str(tmp_path / "copy")
  return config


def test_the_split_seed_is_the_prepared_sets_own(prepared_set, tmp_path):
  config = copy_of(prepared_set, tmp_path)
  manifest_path = tmp_path / "copy" / prepared.MANIFEST
  manifest = json.loads(manifest_path.read_text())
  assert manifest["split_seed"] == sources.SPLIT_SEED and "holdout" in manifest["split_rule"]
  whole = sources.load_split(config, "train")
  val = sources.load(config, "validation")
  manifest["split_seed"] = 5
  manifest_path.write_text(json.dumps(manifest))
  moved = sources.load(config, "validation")
  _, want = sources.holdout(len(whole), 0.1, seed=5)
  np.testing.assert_array_equal(moved.images[np.arange(len(moved))], whole.images[want])
  assert not np.array_equal(moved.images[np.arange(20)], val.images[np.arange(20)])


def test_a_run_refuses_data_the_set_was_not_made_for(prepared_set):
  import copy
  config = copy.deepcopy(prepared_set)  # stored at 16x16x3
  config.data.resolution = 32
  with pytest.raises(sources.DataError, match=r"has 16x16 images but data.resolution=32 would "
                     r"upsample them .* --config.data.upsample=True"):
    sources.load(config, "pretrain")
  config.data.upsample = True  # asked for: allowed
  assert sources.load(config, "pretrain").images.shape[1:] == (16, 16, 3)
  config.data.resolution, config.data.channels = 16, 1
  with pytest.raises(sources.DataError, match="has 3-channel images but data.channels=1"):
    sources.load(config, "test")


def test_damaged_shards_are_found_on_open_or_by_verify(prepared_set, tmp_path):
  config = copy_of(prepared_set, tmp_path)
  with open(tmp_path / "copy" / "train-00002.images", "r+b") as f:
    f.write(bytes([255 - f.read(1)[0]]))  # same size, other bytes: only the hash can tell
  assert len(sources.load(config, "train")) == 180
  config.data.verify = True
  with pytest.raises(sources.DataError, match="shard.s. train-00002 do not match"):
    sources.load(config, "train")
  assert len(sources.load(config, "test")) == 30  # verifies the split it opens
  config.data.verify = False
  with open(tmp_path / "copy" / "train-00004.images", "r+b") as f:
    f.truncate(1000)
  with pytest.raises(config_lib.UserError, match=r"damaged: train-00004.images is 1000 bytes, the "
                     r"manifest says 32 rows of 768 bytes"):
    sources.load(config, "pretrain")


def test_two_hosts_read_disjoint_rows_covering_each_global_batch(prepared_set):
  data = sources.load(prepared_set, "pretrain")
  batch = 16
  kw = dict(batch_size=batch, seed=0, augment="crop", prefetch=0)
  full = pipeline.train_batches(data, **kw)
  # Interleaved row sets, as a TPU slice's device order gives hosts (rows 0-3 and 8-11 ...).
  rows = [np.r_[0:4, 8:12], np.r_[4:8, 12:16]]
  hosts = [pipeline.train_batches(data, rows=rows[h], **kw) for h in range(2)]
  for step in range(14):  # 224 examples: crosses the epoch of 180
    f, h0, h1 = next(full), next(hosts[0]), next(hosts[1])
    for key in ("images", "boxes", "labels"):
      np.testing.assert_array_equal(h0[key], f[key][rows[0]])
      np.testing.assert_array_equal(h1[key], f[key][rows[1]])
    if step * batch // 180 == (step * batch + batch - 1) // 180:  # within one epoch
      r0 = {bytes(x) for x in h0["images"].reshape(8, -1)}
      assert not r0 & {bytes(x) for x in h1["images"].reshape(8, -1)}


def test_resume_at_step_s_gives_the_batches_of_an_uninterrupted_run(prepared_set):
  data = sources.load(prepared_set, "pretrain")
  kw = dict(batch_size=12, seed=5, augment="paper")
  straight = pipeline.train_batches(data, **kw)
  batches = [next(straight) for _ in range(20)]
  resumed = pipeline.train_batches(data, start_step=13, **kw)
  for want in batches[13:]:
    got = next(resumed)
    assert got["step"] == want["step"]
    for key in ("images", "boxes", "labels"):
      np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.parametrize("rows", [None, np.r_[2:6, 10:14]])
def test_tf_data_and_its_python_twin_give_the_same_bytes(prepared_set, rows):
  """Equality, not a tolerance: the same images, labels, boxes and steps, across an epoch
  boundary, from a resumed step, for a host's interleaved rows."""
  pytest.importorskip("tensorflow")
  data = sources.load(prepared_set, "pretrain")
  kw = dict(batch_size=16, seed=3, augment="paper", start_step=5, num_steps=12, rows=rows)
  tf_batches = list(pipeline.train_batches(data, pipeline="tf.data", prefetch=0, **kw))
  py_batches = list(pipeline.train_batches(data, pipeline="python", **kw))
  assert [b["step"] for b in tf_batches] == [b["step"] for b in py_batches] == list(range(5, 17))
  for a, b in zip(tf_batches, py_batches, strict=True):
    for key in ("images", "boxes", "labels"):
      assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape
      assert a[key].tobytes() == b[key].tobytes()
  assert pipeline.resolve_pipeline("auto") == "tf.data"  # TensorFlow is here


def test_remote_reads_are_ranged_and_coalesced(prepared_set, monkeypatch):
  """A prepared set behind an fsspec URL (a local backend that counts bytes and requests):
  the same rows as local reads, under 2x the bytes of the rows asked for, and one request
  for a contiguous run."""
  monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
  import counting_fs
  manifest = prepared.read_manifest(prepared_set.data.prepared)
  shards = manifest["splits"]["train"]["shards"]
  local = prepared.ShardedRows(prepared_set.data.prepared, shards, (16, 16, 3))
  remote = prepared.ShardedRows(counting_fs.url(prepared_set.data.prepared), shards, (16, 16, 3))
  rng = np.random.default_rng(0)
  for _ in range(5):
    idx = rng.integers(0, len(local), 48)
    counting_fs.CountingFileSystem.reset()
    np.testing.assert_array_equal(remote[idx], local[idx])
    assert counting_fs.CountingFileSystem.bytes_read < 2 * 48 * local.row_bytes
  counting_fs.CountingFileSystem.reset()
  np.testing.assert_array_equal(remote[np.arange(40, 60)], local[np.arange(40, 60)])
  assert counting_fs.CountingFileSystem.requests == 1  # rows 40..59 sit in shard 1 (32..63)
  assert counting_fs.CountingFileSystem.bytes_read == 20 * local.row_bytes
  assert prepared.coalesce(np.array([0, 1, 2, 3, 10, 11, 13, 20, 100])) == [
      (0, 4), (10, 14), (20, 21), (100, 101)]


def test_paper_crop_boxes():
  boxes = transform.train_boxes(np.arange(2000), seed=0, augment="paper")
  side = boxes[:, 2] - boxes[:, 0]
  np.testing.assert_allclose(side, boxes[:, 3] - boxes[:, 1], rtol=1e-6)
  # 224 / U(256, 384): sides between 0.583 and 0.875 of the stored (short-side) square.
  assert 0.583 < side.min() < 0.6 and 0.86 < side.max() <= 0.875 + 1e-6
  assert boxes.min() >= 0 and boxes.max() <= 1
  np.testing.assert_allclose(np.mean(224 / side), 320, rtol=0.01)  # U(256, 384): mean 320
  # A box depends on (seed, position) only: any subset of positions draws the same boxes.
  np.testing.assert_array_equal(transform.train_boxes(np.arange(1500, 1600), 0, "paper"),
                                boxes[1500:1600])
  assert not np.array_equal(transform.train_boxes(np.arange(2000), 1, "paper"), boxes)
  # The paper evaluates on "the single 224 x 224 center crop" of the image with its shorter
  # side at 224: the whole stored centre square.
  np.testing.assert_array_equal(transform.eval_boxes(3, "paper")[0], [0, 0, 1, 1])
  assert transform.resolve_augment("auto", full_size=True) == "paper"
  assert transform.resolve_augment("auto", full_size=True, stage="finetune") == "paper"
  assert transform.resolve_augment("auto", full_size=False) == "none"
  assert transform.resolve_augment("auto", full_size=False, stage="finetune") == "wrn"


def test_the_wide_resnet_view_shifts_reflects_and_mirrors_whole_pixels():
  """'wrn', the paper's CIFAR fine-tuning view: each image is np.pad(image, 4, 'reflect')
  cropped back to 32x32 at a whole-pixel offset in [0, 8], mirrored half the time -- the
  pixels the model gets are exactly those, at resolution 32 and (area-averaged) at 16."""
  images = smooth_images(64, 32, seed=3)
  positions = np.arange(64)
  boxes = transform.train_boxes(positions, seed=5, augment="wrn", side=32)
  flipped = boxes[:, 3] < boxes[:, 1]
  assert 20 < flipped.sum() < 44  # about half
  y = np.rint(boxes[:, 0] * 32).astype(int) + 4
  x = np.rint(np.minimum(boxes[:, 1], boxes[:, 3]) * 32).astype(int) + 4
  assert set(y) == set(range(9)) and set(x) == set(range(9))  # every offset, whole pixels
  padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
  want = np.stack([p[i:i + 32, j:j + 32] for p, i, j in zip(padded, y, x)])
  want[flipped] = want[flipped][:, :, ::-1]
  got = transform.pixels_at_resolution(images, boxes, 32)
  np.testing.assert_array_equal(got, want)
  half = transform.pixels_at_resolution(images, boxes, 16).astype(float)
  mean = want.astype(float).reshape(64, 16, 2, 16, 2, 3).mean((2, 4))
  assert np.abs(half - mean).max() <= 0.5 + 1e-3  # the 2x2 means, rounded
  # A box depends on (seed, position) only, as for every view.
  np.testing.assert_array_equal(transform.train_boxes(positions[10:20], 5, "wrn", side=32),
                                boxes[10:20])


def smooth_images(n: int, side: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, side, side, 3), np.uint8)
  images = np.cumsum(images, axis=1, dtype=np.int64) // np.arange(1, side + 1)[None, :, None, None]
  return images.astype(np.uint8)  # smooth rows, like photos


def test_images_at_the_models_resolution_pass_through_unchanged():
  """32x32 images at resolution 32: every pixel as stored, every token the nearest centre of
  the image's own pixel (a bilinear resize blurred 90% of such pixels)."""
  images = smooth_images(16, 32)
  centers = P.fit(P.sample_pixels(images, 5000), 64, iters=3)
  tokens, pixels = transform.Tokenizer(centers, 32).numpy(
      images, transform.eval_boxes(16, "none"), with_pixels=True)
  np.testing.assert_array_equal(pixels, images)
  np.testing.assert_array_equal(tokens, P.quantize_np(images / 127.5 - 1, centers).reshape(16, -1))


@pytest.mark.parametrize("side,resolution", [(32, 8), (28, 14), (28, 12), (64, 24)])
def test_downsampling_is_area_averaging_as_tensorflow_computes_it(side, resolution):
  tf = pytest.importorskip("tensorflow")
  images = smooth_images(6, side, seed=side + resolution)
  boxes = jnp.asarray(transform.eval_boxes(6, "none"))
  ours = np.asarray(transform._area_matrix(boxes[:, 0], boxes[:, 2], side, resolution))
  ours = np.einsum("brh,bhwc,bsw->brsc", ours, images.astype(np.float64),
                   np.asarray(transform._area_matrix(boxes[:, 1], boxes[:, 3], side, resolution)))
  want = tf.image.resize(tf.cast(images, tf.float64), (resolution, resolution), method="area")
  np.testing.assert_allclose(ours, want.numpy(), atol=1e-3)
  levels = transform.pixels_at_resolution(images, np.asarray(boxes), resolution).astype(int)
  want = want.numpy()
  tie = np.abs(want - np.floor(want) - 0.5) < 1e-3  # x.5 exactly: float32 weights pick a side
  np.testing.assert_array_equal(levels[~tie], np.round(want[~tie]))
  assert np.abs(levels - want).max() <= 0.5 + 1e-3


def test_crops_average_exactly_the_area_they_cover():
  """Crop boxes on a 1/4-pixel grid: the reference upsamples each pixel 4x4 (nearest) and takes
  the plain mean of each output pixel's footprint, an independent route to the same areas."""
  rng = np.random.default_rng(1)
  side, out, k = 32, 8, 4
  images = smooth_images(10, side, seed=3)
  big = images.astype(np.float64).repeat(k, axis=1).repeat(k, axis=2)
  boxes, want = [], []
  for image in big:
    q = int(rng.integers(10, 17))  # each output pixel covers q x q quarter-pixels
    extent = out * q  # crop side in quarter-pixels: a whole number per output pixel
    y, x = (int(v) for v in rng.integers(0, side * k - extent + 1, size=2))
    boxes.append(np.array([y, x, y + extent, x + extent], np.float32) / (side * k))
    crop = image[y:y + extent, x:x + extent]
    want.append(crop.reshape(out, q, out, q, 3).mean(axis=(1, 3)))
  levels = transform.pixels_at_resolution(images, np.stack(boxes), out)
  want = np.clip(np.round(np.stack(want)), 0, 255)
  assert np.abs(levels.astype(int) - want).max() <= 1  # float32 weights vs exact thirds etc.
  assert (levels == want).mean() > 0.995


HIDE_TF = """
import sys
for _name in ("tensorflow", "tensorflow_datasets"):  # import fails, find_spec says absent
  sys.modules[_name] = None
"""


def test_pretraining_from_a_prepared_set_without_tensorflow(prepared_set, tmp_path):
  script = HIDE_TF + textwrap.dedent(f"""
      import json, sys
      import numpy as np
      from igpt_jax import config as config_lib
      from igpt_jax.stages import pretrain as pretrain_stage
      from igpt_jax.data import pipeline, sources, transform
      c = config_lib.base_config()
      c.data.source, c.data.prepared, c.data.resolution = "prepared", {prepared_set.data.prepared!r}, 8
      c.palette.k, c.palette.samples, c.palette.iters = 8, 2000, 2
      c.model.num_layers, c.model.d_model, c.model.num_heads = 1, 16, 2
      c.train.steps, c.train.batch_size, c.train.warmup_steps, c.train.log_every = 3, 8, 1, 1
      c.train.eval_every, c.train.eval_batches, c.train.sample_every = 3, 1, 0
      out = pretrain_stage.run(c, {str(tmp_path / "run")!r}, log=lambda *_: None)
      assert sys.modules["tensorflow"] is None  # still hidden: nothing imported it
      data = sources.load(c, "pretrain")
      batch = next(pipeline.train_batches(data, batch_size=8, seed=0, augment="crop"))
      centers = np.load({str(tmp_path / "run" / "palette.npz")!r})["centers"]
      tokens = transform.Tokenizer(centers, 8).numpy(batch["images"], batch["boxes"])
      np.savez({str(tmp_path / "batch.npz")!r}, tokens=tokens, centers=centers, **batch)
      print(json.dumps({{"step": out["step"], "loss": out["loss"]}}))
  """)
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["step"] == 3 and np.isfinite(result["loss"])
  # The same batch here, where TensorFlow is importable: the same tokens, to the last one.
  b = np.load(tmp_path / "batch.npz")
  here = transform.Tokenizer(b["centers"], 8).numpy(b["images"], b["boxes"])
  np.testing.assert_array_equal(b["tokens"], here)


def test_tfds_download_and_prepare_offline(tmp_path, monkeypatch):
  """TFDS's real download_and_prepare (not mock_data) on a builder whose files sit in the
  manual download directory, then our prepare stage on top of it."""
  pytest.importorskip("tensorflow_datasets")
  monkeypatch.syspath_prepend(os.path.dirname(__file__))
  import tiny_tfds  # noqa: F401 - registers igpt_tiny_shapes
  rng = np.random.default_rng(2)
  data_dir = tmp_path / "tfds"
  for split, n in (("train", 20), ("test", 6)):
    manual = data_dir / "downloads" / "manual" / split
    manual.mkdir(parents=True)
    for i in range(n):
      h, w = rng.integers(20, 40, 2)
      Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(manual / f"{i % 2}_{i:03d}.png")
  # A truncated PNG: TFDS stores its bytes as they are, and it fails only when decoded.
  broken = data_dir / "downloads" / "manual" / "train" / "1_021.png"
  broken.write_bytes((broken.parent / "0_000.png").read_bytes()[:70])
  config = config_for("tfds", data_dir, tmp_path / "prep", shard_size=8, name="igpt_tiny_shapes")
  logs = []
  result = prepare.run(config, log=logs.append)
  assert result["examples"] == {"train": 20, "test": 6} and result["full_size"]
  assert result["skipped"] == {"train": 1, "test": 0}
  assert (data_dir / "igpt_tiny_shapes" / "1.0.0").is_dir()  # TFDS prepared it itself
  [name] = prepared.read_manifest(config.data.prepared)["splits"]["train"]["skipped"]
  assert name.startswith("igpt_tiny_shapes:train[") and any(name in line for line in logs)
  data = sources.load_split(as_prepared(config), "train")
  assert data.images.shape == (20, 16, 16, 3) and data.class_names == ["dark", "light"]
  assert set(data.labels.tolist()) == {0, 1}


def build_tiny_tfds(data_dir, n_train=20, n_test=6, seed=2):
  import tensorflow_datasets as tfds
  import tiny_tfds  # noqa: F401 - registers igpt_tiny_shapes
  rng = np.random.default_rng(seed)
  for split, n in (("train", n_train), ("test", n_test)):
    manual = data_dir / "downloads" / "manual" / split
    manual.mkdir(parents=True)
    for i in range(n):
      h, w = rng.integers(20, 40, 2)
      Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(manual / f"{i % 2}_{i:03d}.png")
  tfds.builder("igpt_tiny_shapes", data_dir=str(data_dir)).download_and_prepare()


def test_two_processes_prepare_a_tfds_source_once_on_first_use(tmp_path, monkeypatch):
  """data.source=tfds in a stage: process 0 prepares it under the workdir, the other waits,
  both train from the prepared set (no process holds the split in memory)."""
  pytest.importorskip("tensorflow_datasets")
  monkeypatch.syspath_prepend(os.path.dirname(__file__))
  from test_multihost import local
  build_tiny_tfds(tmp_path / "tfds", n_train=40)
  workdir = tmp_path / "run"
  code, out = local(2, 1, "--config=configs/demo.py", "--config.stage=pretrain",
                    "--config.data.source=tfds", "--config.data.name=igpt_tiny_shapes",
                    f"--config.data.path={tmp_path / 'tfds'}", "--config.data.resolution=8",
                    "--config.data.channels=3", "--config.palette.k=8",
                    "--config.palette.samples=2000", "--config.model.num_layers=1",
                    "--config.model.d_model=16", "--config.model.num_heads=2",
                    "--config.train.steps=3", "--config.train.batch_size=4",
                    "--config.train.eval_every=0", "--config.train.sample_every=0",
                    f"--workdir={workdir}", timeout=600)
  assert code == 0, out[-3000:]
  assert out.count("preparing it once into") == 1
  manifest = prepared.read_manifest(workdir / "prepared" / "igpt_tiny_shapes-8px-3ch")
  assert manifest["source"] == "tfds:igpt_tiny_shapes" and manifest["splits"]["train"]["count"] == 40
  assert len((workdir / "metrics.jsonl").read_text().splitlines()) >= 1
  # The prepared set is the source from now on: a stage run again prepares nothing.
  config = config_for("tfds", tmp_path / "tfds", "", name="igpt_tiny_shapes")
  logs = []
  resolved = prepare.resolved(config, str(workdir), log=logs.append)
  assert resolved.data.source == "prepared" and not logs
  assert config.data.source == "tfds"  # the caller's config is not changed


PRETRAIN_RSS = """
import json, resource, sys
from igpt_jax import config as config_lib
from igpt_jax.stages import pretrain as pretrain_stage
c = config_lib.base_config()
c.data.source, c.data.prepared, c.data.resolution, c.data.channels = "prepared", sys.argv[1], 32, 1
c.palette.k, c.palette.samples, c.palette.iters = 16, 2000, 2
c.model.num_layers, c.model.d_model, c.model.num_heads = 1, 16, 2
c.train.steps, c.train.batch_size, c.train.warmup_steps, c.train.log_every = 4, 16, 1, 2
c.train.eval_every, c.train.eval_batches, c.train.sample_every = 4, 2, 0
out = pretrain_stage.run(c, sys.argv[2], log=lambda *_: None)
print(json.dumps({"step": out["step"], "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def test_pretraining_memory_does_not_grow_with_the_data_set(tmp_path):
  """A prepared set 10x larger (164 MB vs 16 MB of pixels) raises peak RSS by < 100 MB: only
  the rows of each batch (and the palette's sample) are read. (Reading it whole would add
  148 MB; run-to-run noise of the peak is ~40 MB with malloc's arenas capped.)"""
  peaks = {}
  for name, n in (("small", 4_000), ("large", 40_000)):
    directory = tmp_path / name
    rng = np.random.default_rng(0)
    shards = []
    for j, lo in enumerate(range(0, n, 5_000)):
      count = min(5_000, n - lo)
      shards.append(prepared.write_shard(directory, "train", j,
                                         rng.integers(0, 256, (count, 64, 64, 1), np.uint8),
                                         rng.integers(0, 10, count)))
    test = [prepared.write_shard(directory, "test", 0, np.zeros((20, 64, 64, 1), np.uint8),
                                 np.zeros(20))]
    record = prepared.settings(source="synthetic", side=64, channels=1, full_size=False,
                               shard_size=5_000, split_seed=0,
                               split_rule=sources.SPLIT_RULES["permutation"])
    prepared.write_manifest(directory, settings_record=record, class_names=[str(i) for i in range(10)],
                            splits={"train": shards, "test": test})
    proc = subprocess.run([sys.executable, "-c", PRETRAIN_RSS, str(directory),
                           str(tmp_path / f"run_{name}")], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "MALLOC_ARENA_MAX": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["step"] == 4
    peaks[name] = result["max_rss_mb"]
  print("peak RSS MB", peaks)
  assert peaks["large"] - peaks["small"] < 100, peaks
