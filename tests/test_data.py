"""Sources and the input pipeline: bad files, determinism by step, host sharding, TFDS."""
import ml_collections
import numpy as np
import pytest
from PIL import Image

from igpt_jax import config as config_lib
from igpt_jax import palette as P
from igpt_jax.data import pipeline, sources
from igpt_jax.data.sources import fashion_mnist as fmnist_source
from igpt_jax.data.sources import folder as folder_source
from igpt_jax.data.sources import tfds as tfds_source

GRAY16 = P.uniform_grid(16, 1)
RGB8 = P.uniform_grid(8, 3)


def small_set(n=50, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  return sources.from_arrays(rng.integers(0, 256, (n, 16, 16, channels), dtype=np.uint8),
                             rng.integers(0, 4, n))


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_bad_files_in_a_folder(tmp_path):
  (tmp_path / "cats").mkdir()
  (tmp_path / "dogs").mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (40, 30, 4), dtype=np.uint8), "RGBA").save(tmp_path / "cats/rgba.png")
  Image.fromarray(rng.integers(0, 256, (50, 50), dtype=np.uint8), "L").save(tmp_path / "cats/gray.jpg")
  Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(tmp_path / "dogs/tiny.png")
  Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), "P").save(tmp_path / "dogs/palette.png")
  good = tmp_path / "dogs/good.png"
  Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
  (tmp_path / "dogs/corrupt.png").write_bytes(good.read_bytes()[:60])  # truncated
  logs = []
  data = folder_source.load_folder(str(tmp_path), "train", channels=3, resolution=8,
                                   eval_fraction=0.0, log=logs.append)
  # Stored at the smallest image's side (tiny.png, 10 px), not enlarged to 2 x 8.
  assert len(data) == 5 and data.images.shape[1:] == (10, 10, 3) and not data.full_size
  assert data.class_names == ["cats", "dogs"] and sorted(set(data.labels)) == [0, 1]
  assert len(data.skipped_files) == 1 and data.skipped_files[0].endswith("corrupt.png")
  assert sum("corrupt.png" in line for line in logs) == 1
  batches = list(pipeline.eval_batches(data, batch_size=2))
  assert len(batches) == 3 and sum(b["mask"].sum() for b in batches) == 5
  assert pipeline.tokens_of(data, RGB8, 8).shape == (5, 64)


def test_folder_errors_are_one_sentence(tmp_path):
  with pytest.raises(sources.DataError, match="No images"):
    folder_source.load_folder(str(tmp_path), "train", 3, 8)
  with pytest.raises(sources.DataError, match="does not exist"):
    folder_source.load_folder(str(tmp_path / "nope"), "train", 3, 8)


def test_a_folder_laid_out_by_split_reads_its_folders_as_the_splits(tmp_path):
  """ImageNet's layout, root/train/<class> and root/val/<class>: val/ is the test split and the
  classes are train's -- not 4 classes 'train/a' ... with val's images hashed into train."""
  for split, count in (("train", 6), ("val", 3)):
    for name in ("a", "b"):
      (tmp_path / split / name).mkdir(parents=True)
      for i in range(count):
        value = {"train": 0, "val": 100}[split] + 10 * (name == "b") + i
        Image.fromarray(np.full((12, 12, 3), value, np.uint8)).save(
            tmp_path / split / name / f"{i}.png")
  train = folder_source.load_folder(str(tmp_path), "train", 3, 8)
  test = folder_source.load_folder(str(tmp_path), "test", 3, 8)
  assert train.class_names == test.class_names == ["a", "b"]
  assert (len(train), len(test)) == (12, 6)
  assert (train.images[:, 0, 0, 0] < 100).all() and (test.images[:, 0, 0, 0] >= 100).all()
  assert list(test.labels) == [0, 0, 0, 1, 1, 1]
  (tmp_path / "val" / "c").mkdir()
  Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(tmp_path / "val" / "c" / "0.png")
  with pytest.raises(sources.DataError, match="has class folder\\(s\\) train/ does not: c"):
    folder_source.load_folder(str(tmp_path), "test", 3, 8)
  (tmp_path / "test").mkdir()
  with pytest.raises(sources.DataError, match="has test/, val/ beside train/"):
    folder_source.load_folder(str(tmp_path), "train", 3, 8)


def test_classifying_one_class_or_unlabelled_data_says_what_the_data_has(tmp_path):
  (tmp_path / "cats").mkdir()
  for i in range(4):
    Image.fromarray(np.full((12, 12, 3), i, np.uint8)).save(tmp_path / "cats" / f"{i}.png")
  one_class = folder_source.load_folder(str(tmp_path), "train", 3, 8, eval_fraction=0.0)
  with pytest.raises(config_lib.UserError, match="Fine-tuning classifies, which needs 2 classes "
                     r"or more; .* has one class \('cats'\)"):
    one_class.require_classes("Fine-tuning")
  with pytest.raises(config_lib.UserError, match="has no class labels"):
    sources.from_arrays(np.zeros((3, 8, 8, 1), np.uint8)).require_classes("The probe")
  small_set().require_classes("The probe")  # 4 classes: fine


def test_folder_split_is_a_stable_hash(tmp_path):
  for i in range(40):
    Image.fromarray(np.full((12, 12, 3), i, np.uint8)).save(tmp_path / f"{i}.png")
  train = folder_source.load_folder(str(tmp_path), "train", 3, 8, eval_fraction=0.25)
  test = folder_source.load_folder(str(tmp_path), "test", 3, 8, eval_fraction=0.25)
  assert len(train) + len(test) == 40 and 3 <= len(test) <= 20
  assert not set(train.images[:, 0, 0, 0]) & set(test.images[:, 0, 0, 0])
  assert (train.labels == -1).all()  # flat folder: unlabelled
  # Through the config: the run's seed does not move an image from test to train.
  config = config_lib.base_config()
  config.data.source, config.data.path, config.data.resolution = "folder", str(tmp_path), 8
  tests = []
  for seed in (0, 7):
    config.seed = seed
    tests.append(sorted(sources.load_split(config, "test").images[:, 0, 0, 0].tolist()))
  assert tests[0] == tests[1]


def test_validation_held_out_of_a_folder_moves_only_the_files_that_change(tmp_path):
  """Validation membership is a hash of each file's path, for the folder and for the set
  prepared from it (the same images): a file that becomes unreadable, or a new one, changes
  its own membership and no other (a permutation of n moved about half of them)."""
  from igpt_jax.stages import prepare as prepare_stage
  photos = tmp_path / "photos"
  for name in ("a", "b"):
    (photos / name).mkdir(parents=True)
    for i in range(100):
      Image.fromarray(np.full((12, 12, 3), (i, 100 * (name == "b"), 7), np.uint8)).save(
          photos / name / f"{i}.png")
  config = config_lib.base_config()
  config.data.source, config.data.path, config.data.resolution = "folder", str(photos), 8
  config.data.validation_fraction = 0.2

  def held_out(config):
    val = sources.load(config, "validation", log=lambda *_: None)
    images = np.asarray(val.images[np.arange(len(val))])  # a prepared set's rows, read
    return {tuple(px) for px in images[:, 0, 0].tolist()}  # each image's own colour

  before = held_out(config)
  assert 10 <= len(before) <= 50 and sources.split_rule(config) == "keyed"
  (photos / "a" / "3.png").write_bytes(b"not a png")  # one file lost
  Image.fromarray(np.full((12, 12, 3), (200, 0, 7), np.uint8)).save(photos / "a" / "new.png")
  after = held_out(config)
  assert len(before ^ after) <= 3, (before ^ after)  # at most the lost, the new (and its twin)
  assert before - after <= {(3, 0, 7)} and after - before <= {(200, 0, 7)}
  # The prepared set holds out the same files (it stores their paths as keys).
  prepared = config.copy_and_resolve_references()
  prepared.data.prepared = str(tmp_path / "prepared")
  prepare_stage.run(prepared, str(tmp_path / "run"), log=lambda *_: None)
  prepared.data.source = "prepared"
  assert sources.split_rule(prepared) == "keyed" and held_out(prepared) == after


def test_an_imagenet_sized_folder_holds_out_the_papers_four_percent(tmp_path, monkeypatch):
  for i in range(30):
    Image.fromarray(np.full((12, 12, 3), i, np.uint8)).save(tmp_path / f"{i}.png")
  config = config_lib.base_config()
  config.data.source, config.data.path, config.data.resolution = "folder", str(tmp_path), 8
  assert sources.validation_fraction(config) == 0.1
  monkeypatch.setattr(folder_source, "IMAGENET_SIZED", 20)  # 1,000,000 in life
  assert sources.validation_fraction(config) == 0.04


def test_a_run_is_not_resumed_under_another_hold_out(tmp_path):
  """A checkpoint saved before folders held out by path (no split_rule in its meta) is not
  resumed by a folder run: it would train on images it validated on."""
  from igpt_jax import checkpoint as checkpoint_lib
  from igpt_jax import workdir as workdir_lib
  workdir_lib.check_split_rule({"split_rule": "keyed"}, "keyed", "w")
  workdir_lib.check_split_rule({}, "permutation", "w")  # arrays: as before
  with pytest.raises(checkpoint_lib.CheckpointMismatch,
                     match="held validation out of train by 'permutation', this version"):
    workdir_lib.check_split_rule({}, "keyed", "w")


def test_iterator_started_at_step_s_continues_exactly():
  data = small_set()
  kw = dict(batch_size=8, seed=3, augment="crop")
  from_zero = take(pipeline.train_batches(data, **kw), 12)  # crosses epochs (50 examples)
  from_seven = take(pipeline.train_batches(data, start_step=7, **kw), 5)
  for a, b in zip(from_zero[7:], from_seven, strict=True):
    for key in ("images", "boxes", "labels"):
      np.testing.assert_array_equal(a[key], b[key])
    assert a["step"] == b["step"]
  assert not np.array_equal(from_zero[0]["images"], from_zero[1]["images"])
  assert not np.array_equal(from_zero[0]["boxes"], from_zero[1]["boxes"])
  other_seed = take(pipeline.train_batches(data, batch_size=8, seed=4, augment="crop"), 1)
  assert not np.array_equal(other_seed[0]["images"], from_zero[0]["images"])


def test_every_example_once_per_epoch_and_hosts_disjoint():
  n, batch = 64, 16
  steps = n // batch
  seen = {}
  for host in range(2):
    rows = np.arange(host * batch // 2, (host + 1) * batch // 2)
    pos = np.concatenate([pipeline.step_positions(s, batch, rows) for s in range(steps)])
    seen[host] = set(pipeline.example_indices(pos, n, seed=0))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(n))
  # The two hosts' local batches from the real pipeline are disjoint slices of the global one.
  data = sources.from_arrays(np.arange(n, dtype=np.uint8)[:, None, None, None].repeat(4, 1).repeat(4, 2),
                             np.arange(n))
  full = next(pipeline.train_batches(data, batch_size=batch, seed=0))
  halves = [next(pipeline.train_batches(data, batch_size=batch, seed=0,
                                        rows=np.arange(h * batch // 2, (h + 1) * batch // 2)))
            for h in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["labels"] for h in halves]), full["labels"])
  assert not set(halves[0]["labels"]) & set(halves[1]["labels"])


def test_eval_batches_cover_the_split_in_order_across_hosts():
  data = small_set(n=23)
  per_host = [list(pipeline.eval_batches(data, batch_size=8, rows=rows))
              for rows in (np.arange(0, 4), np.arange(4, 8))]
  # Uneven split: both hosts still run the same number of (padded) global batches.
  assert [len(b) for b in per_host] == [3, 3]
  labels = [b["labels"][b["mask"] > 0] for j in range(3) for h in range(2) for b in [per_host[h][j]]]
  np.testing.assert_array_equal(np.concatenate(labels), data.labels)
  # The last global batch holds examples 16..22 and one pad: host 1's rows 20, 21, 22, pad.
  assert per_host[0][-1]["mask"].tolist() == [1, 1, 1, 1]
  assert per_host[1][-1]["mask"].tolist() == [1, 1, 1, 0]


def test_palette_channel_mismatch_is_explained():
  with pytest.raises(ValueError, match="fit a palette"):
    pipeline.tokens_of(small_set(channels=3), GRAY16, 8)


def test_channel_conversion():
  rgb = np.array([[[[255, 0, 0]]]], np.uint8)
  assert sources.to_channels(rgb, 1)[0, 0, 0, 0] == 76  # ITU-R 601 luma of pure red
  assert sources.to_channels(np.zeros((1, 2, 2, 1), np.uint8), 3).shape == (1, 2, 2, 3)


def test_fashion_mnist_from_local_idx_files():
  directory = sources.fashion_mnist_dir()
  if directory is None:
    pytest.skip("Debian's dataset-fashion-mnist is not installed")
  config = config_lib.base_config()
  config.data.source, config.data.channels, config.data.resolution = "fashion_mnist", 1, 28
  train, test = sources.load(config, "pretrain"), sources.load(config, "test")
  validation = sources.load(config, "validation")
  # 10% of the 60k train images held out for validation (the paper's CIFAR fraction).
  assert train.images.shape == (54000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
  assert validation.images.shape == (6000, 28, 28, 1)
  assert np.bincount(test.labels).tolist() == [1000] * 10
  assert train.num_classes == 10


def test_idx_files_found_through_igpt_data_dir(tmp_path, monkeypatch):
  import gzip
  import struct
  images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
  for prefix in ("train", "t10k"):
    with gzip.open(tmp_path / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
      f.write(struct.pack(">HBB3I", 0, 8, 3, 2, 28, 28) + images.tobytes())
    with gzip.open(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
      f.write(struct.pack(">HBBI", 0, 8, 1, 2) + bytes([3, 7]))
  monkeypatch.setenv("IGPT_DATA_DIR", str(tmp_path))
  monkeypatch.setattr(fmnist_source, "FASHION_MNIST_DIRS", ())
  data = fmnist_source.load_fashion_mnist(sources.fashion_mnist_dir(), "test", channels=1)
  np.testing.assert_array_equal(data.images[..., 0], images)
  assert data.labels.tolist() == [3, 7]


@pytest.mark.parametrize("name,role,split", [("cifar10", "train", "train"),
                                             ("stl10", "pretrain", "unlabelled"),
                                             ("imagenet_resized/32x32", "test", "validation")])
def test_tfds_sources_with_mock_data(name, role, split):
  tfds = pytest.importorskip("tensorflow_datasets")
  assert tfds_source.tfds_split(name, role) == split
  config = config_lib.base_config()
  config.data.source, config.data.name, config.data.resolution = "tfds", name, 8
  config.data.validation_fraction = 0.0
  with tfds.testing.mock_data(num_examples=12):
    data = sources.load(config, role)
  assert len(data) == 12 and data.images.dtype == np.uint8 and data.images.shape[-1] == 3
  tokens = pipeline.tokens_of(data, RGB8, 8)
  assert tokens.shape == (12, 64) and tokens.max() < 8


def test_missing_tfds_dataset_is_explained(tmp_path):
  config = config_lib.base_config()
  config.data.source, config.data.name, config.data.path = "tfds", "not_a_dataset_xyz", str(tmp_path)
  with pytest.raises(sources.DataError, match="not available"):
    sources.load(config, "train")


def test_read_ahead_thread_stops_on_close_and_passes_errors_on():
  import itertools
  import threading
  it = pipeline.prefetched(itertools.count(), 2)
  assert [next(it), next(it)] == [0, 1]
  it.close()
  deadline = 50
  while any(t.name == "input-prefetch" for t in threading.enumerate()) and deadline:
    threading.Event().wait(0.05)
    deadline -= 1
  assert not any(t.name == "input-prefetch" for t in threading.enumerate())

  def broken():
    yield 1
    raise OSError("short read")
  it = pipeline.prefetched(broken(), 2)
  assert next(it) == 1
  with pytest.raises(OSError, match="short read"):
    next(it)


def test_small_folder_images_are_never_enlarged_without_a_word(tmp_path):
  """A folder of 8x8 PNGs at data.resolution=32 is refused as an .npz of them is (or enlarged
  on request); 32x32 photos at 32 are stored at 32 (not blown up to 64) and get no random crop;
  photos of 64 px and more are stored at 64 with the paper's crops, as before."""
  from igpt_jax.data import transform
  rng = np.random.default_rng(0)
  for side, folder in ((8, "tiny"), (32, "crops"), (80, "photos")):
    for cls in ("a", "b"):
      (tmp_path / folder / cls).mkdir(parents=True)
      for i in range(6):
        Image.fromarray(rng.integers(0, 256, (side, side + i, 3), np.uint8)).save(
            tmp_path / folder / cls / f"{i}.png")
  config = config_lib.base_config()
  config.data.source, config.data.resolution = "folder", 32
  config.data.path = str(tmp_path / "tiny")
  with pytest.raises(sources.DataError, match=r"12 of the 12 images in .* are smaller than "
                     r"data.resolution=32 .*short side 8 px.*--config.data.upsample=True"):
    sources.load(config, "train")
  config.data.upsample = True
  assert sources.load(config, "train").images.shape[1:3] == (32, 32)
  config.data.upsample = False
  for folder, side, augment in (("crops", 32, "none"), ("photos", 64, "paper")):
    config.data.path = str(tmp_path / folder)
    data = sources.load(config, "train")
    assert data.images.shape[1:3] == (side, side), folder
    assert transform.resolve_augment("auto", data.full_size) == augment, folder


def test_tensorflow_never_sees_the_gpus(monkeypatch):
  """Wherever igpt_jax imports TensorFlow (the tf.data feed, TFDS, OpenAI's checkpoint reader)
  its GPUs are hidden first: a GPU build would otherwise reserve memory JAX needs."""
  from igpt_jax import tfimport
  tf = pytest.importorskip("tensorflow")
  hidden = []
  monkeypatch.setattr(tf.config, "set_visible_devices",
                      lambda devices, kind=None: hidden.append((list(devices), kind)))
  monkeypatch.setattr(tfimport, "_gpus_hidden", False, raising=False)
  assert pipeline.resolve_pipeline("auto") == "tf.data"  # the training feed's first TF import
  assert hidden == [([], "GPU")]
