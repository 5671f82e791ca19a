"""data.source='tfds': a TensorFlow Datasets set by name (data.name), from data.path as its
data_dir. Loaded whole into memory by `load_split` (small sets); stages read TFDS through a
prepared set made on first use (`prepared_on_first_use`), so host memory does not grow with the
data set."""

from __future__ import annotations

import copy

import numpy as np

from igpt_jax import tfimport
from igpt_jax.data.sources.base import (DataError, ImageSet, Layout, Source, StoredSplit,
                                        storage_side, to_channels)

IMAGENET_NAMES = ("imagenet2012", "imagenet_resized/32x32", "imagenet_resized/64x64")

# Which TFDS split serves each role. stl10 pretrains on its unlabelled split.
TFDS_SPLITS = {
    "cifar10": ("train", "train", "test"),
    "cifar100": ("train", "train", "test"),
    "stl10": ("unlabelled", "train", "test"),
    "fashion_mnist": ("train", "train", "test"),
    "mnist": ("train", "train", "test"),
    "imagenet_resized/32x32": ("train", "train", "validation"),
    "imagenet_resized/64x64": ("train", "train", "validation"),
    "imagenet2012": ("train", "train", "validation"),
}


class Tfds(Source):
  name = "tfds"
  defining_fields = ("data.source", "data.name", "data.path")

  def has_pretrain_split(self) -> bool:
    return tfds_split(self.d.name, "pretrain") != tfds_split(self.d.name, "train")

  def validation_fraction(self) -> float:
    return 0.04 if self.d.name in IMAGENET_NAMES else 0.1

  def load_split(self, split: str) -> ImageSet:
    d = self.d
    return load_tfds(d.name, split, d.channels, d.resolution, data_dir=d.path, log=self.log)

  def layout(self, pool) -> Layout:
    del pool  # tf.data decodes in parallel on its own
    d = self.d
    builder = tfds_builder(d.name, d.path, self.log)
    class_names, full_size = tfds_info(builder)
    side = (storage_side(d.resolution) if full_size
            else builder.info.features["image"].shape[0])
    splits = {}
    for role in ("pretrain", "train", "test"):
      split = tfds_split(d.name, role)
      if role == "pretrain" and not self.has_pretrain_split():
        continue
      splits[role] = StoredSplit(builder.info.splits[split].num_examples,
                                 lambda lo, hi, split=split: read_tfds(
                                     builder, split, lo, hi, d.channels, side))
    return Layout(f"tfds:{d.name}", side, full_size, class_names, splits)

  def prepared_on_first_use(self):
    return copy.deepcopy(self.config)

  @classmethod
  def describe(cls, data: dict) -> str:
    return f"{data.get('name', '?')} (TFDS)"


def tfds_split(name: str, split: str) -> str:
  """The TFDS split behind our 'pretrain', 'train' or 'test' (validation comes out of train)."""
  splits = TFDS_SPLITS.get(name, ("train", "train", "test"))
  return splits[("pretrain", "train", "test").index(split)]


def tfds_builder(name: str, data_dir: str = "", log=print):
  """The TFDS builder of `name`, downloaded and prepared first if it is not yet (data sets that
  need manual downloads, like imagenet2012, read them from <data_dir>/downloads/manual)."""
  tfimport.tensorflow()  # first: TFDS starts TensorFlow's runtime, whose GPUs are then hidden
  import tensorflow_datasets as tfds
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
    if not builder.is_prepared():  # TFDS decides, on gs:// too
      log(f"TFDS {name}: not prepared under {builder.data_dir_root}; downloading and preparing.")
      builder.download_and_prepare()
    return builder
  except Exception as e:  # noqa: BLE001
    raise DataError(f"TFDS data set {name!r} is not available: {e}. Prepare it with `tfds build "
                    f"{name}` (manual downloads under <data_dir>/downloads/manual), or set "
                    "--config.data.path to its TFDS data_dir.") from e


def tfds_info(builder) -> tuple[list[str], bool]:
  """(class names, whether images vary in size: full-size photos such as imagenet2012)."""
  features = builder.info.features
  names = list(features["label"].names) if "label" in features else []
  return names, None in features["image"].shape[:2]


def read_tfds(builder, split: str, lo: int | None, hi: int | None, channels: int, side: int):
  """Examples [lo, hi) (None: all) of a TFDS split -> (uint8 [n, S, S, C], int32 labels, names
  of the examples that did not decode). Decoding and resizing run in parallel on the host's
  cores (tf.data); images of varying size get their short side resized to `side` (bicubic,
  antialiased) and the centre square kept; fixed-size images are kept as they are.

  An example whose image does not decode (a truncated or foreign file that TFDS stored as it
  was) is skipped and named `<name>:<split>[<index>]`, as an image folder names its files:
  one bad JPEG among ImageNet's 1.28M must not stop a preparation of hours."""
  tf = tfimport.tensorflow()
  import tensorflow_datasets as tfds
  _, full_size = tfds_info(builder)
  feature = builder.info.features["image"]
  piece = split if lo is None else f"{split}[{lo}:{hi}]"

  def convert(index, ex):
    image = feature.decode_example(ex["image"])
    if full_size:
      shape = tf.cast(tf.shape(image)[:2], tf.float32)
      scale = side / tf.reduce_min(shape)
      size = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), side)
      image = tf.image.resize(image, size, method="bicubic", antialias=True)
      top, left = (size[0] - side) // 2, (size[1] - side) // 2
      image = tf.cast(tf.clip_by_value(tf.round(image[top:top + side, left:left + side]), 0, 255),
                      tf.uint8)
    label = tf.cast(ex["label"], tf.int32) if "label" in ex else tf.constant(-1, tf.int32)
    return index, image, label

  ds = builder.as_dataset(split=piece, shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
  ds = ds.enumerate().map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  indices, images, labels = [], [], []
  for index, image, label in ds.ignore_errors().batch(256).prefetch(2).as_numpy_iterator():
    indices.append(index)
    images.append(image)
    labels.append(label)
  expected = builder.info.splits[piece].num_examples if builder.info.splits else None
  got = np.concatenate(indices) if indices else np.zeros(0, np.int64)
  missing = sorted(set(range(expected if expected is not None else len(got))) - set(got.tolist()))
  skipped = [f"{builder.name}:{split}[{(lo or 0) + i}]" for i in missing]
  if not images:
    return np.zeros((0, side, side, channels), np.uint8), np.zeros(0, np.int32), skipped
  return (to_channels(np.concatenate(images), channels),
          np.concatenate(labels).astype(np.int32), skipped)


def load_tfds(name: str, role: str, channels: int, resolution: int, data_dir: str = "",
              log=print) -> ImageSet:
  """Loads a TFDS split into memory: for small data sets; prepare large ones."""
  builder = tfds_builder(name, data_dir, log)
  split = tfds_split(name, role)
  splits = builder.info.splits
  if splits and split not in splits:
    raise DataError(f"TFDS data set {name!r} has no split {split!r} (it has {', '.join(splits)}).")
  class_names, full_size = tfds_info(builder)
  if splits and splits[split].num_examples > 200_000:
    log(f"warning: loading all {splits[split].num_examples} images of {name}:{split} into memory; "
        "for data this size run --config.stage=prepare and train with "
        "--config.data.source=prepared.")
  images, labels, skipped = read_tfds(builder, split, None, None, channels,
                                      storage_side(resolution))
  for example in skipped:
    log(f"warning: skipping undecodable example {example}")
  if not len(images):
    raise DataError(f"TFDS split {name}:{split} is empty.")
  return ImageSet(images, labels, class_names, f"tfds:{name}:{split}", skipped,
                  full_size=full_size, decoded_side=images.shape[1] if full_size else 0)
