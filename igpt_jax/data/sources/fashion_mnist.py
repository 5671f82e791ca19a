"""Fashion-MNIST from its IDX files: data.path, $IGPT_DATA_DIR, or Debian's
dataset-fashion-mnist; TFDS's copy where none is found and no path was given."""

from __future__ import annotations

import copy
import gzip
import os
import struct

import numpy as np

from igpt_jax.data.sources.base import DataError, ImageSet, Source, to_channels

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]


class FashionMnist(Source):
  name = "fashion_mnist"

  def load_split(self, split: str) -> ImageSet:
    d = self.d
    directory = fashion_mnist_dir(d.path)
    if d.path and directory != d.path:  # a path that was given is used or refused
      raise DataError(f"--config.data.path={d.path!r} holds no Fashion-MNIST IDX files "
                      "(train-images-idx3-ubyte.gz ...): point it at the folder that does, or "
                      "leave it empty to use $IGPT_DATA_DIR or Debian's dataset-fashion-mnist.")
    if directory is not None:
      return load_fashion_mnist(directory, split, d.channels)
    self.log("Fashion-MNIST IDX files not found locally (install Debian's dataset-fashion-mnist "
             "or set $IGPT_DATA_DIR); trying TFDS.")
    from igpt_jax.data.sources import tfds
    return tfds.load_tfds("fashion_mnist", split, d.channels, d.resolution, log=self.log)

  def prepared_on_first_use(self):
    """Only without a path and without local files: TFDS's copy, prepared once (a given
    data.path is used or refused, never replaced)."""
    if self.d.path or fashion_mnist_dir() is not None:
      return None
    out = copy.deepcopy(self.config)
    out.data.source, out.data.name = "tfds", "fashion_mnist"
    return out


def _read_idx(path: str) -> np.ndarray:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
  if zero != 0 or dtype_code != 0x08:
    raise DataError(f"{path} is not a uint8 IDX file.")
  shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_dir(configured: str = "") -> str | None:
  """The first directory holding the IDX files: configured path, $IGPT_DATA_DIR, Debian's."""
  candidates = [configured] if configured else []
  if os.environ.get("IGPT_DATA_DIR"):
    root = os.environ["IGPT_DATA_DIR"]
    candidates += [root, os.path.join(root, "fashion-mnist"), os.path.join(root, "fashion_mnist")]
  candidates += list(FASHION_MNIST_DIRS)
  for d in candidates:
    if d and os.path.exists(os.path.join(d, "train-images-idx3-ubyte.gz")):
      return d
  return None


def load_fashion_mnist(directory: str, role: str, channels: int) -> ImageSet:
  prefix = "t10k" if role == "test" else "train"
  images = _read_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"))
  labels = _read_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"))
  return ImageSet(to_channels(images, channels), labels.astype(np.int32),
                  FASHION_MNIST_CLASSES, f"fashion_mnist:{prefix}")
