"""Where images come from: TFDS, local Fashion-MNIST IDX files, an image folder, numpy arrays.

Every source yields an `ImageSet`: uint8 images [N, H, W, C] in memory plus integer labels.
Random access by index is what lets the pipeline make the example order a pure function of
(seed, step). Images of varying size (image folders, imagenet2012) are stored at
`storage_side(resolution)` so the random crop still has pixels to choose from. The data set must
fit in host memory at that size (ImageNet 32x32: 3.9 GB; 64x64: 15.7 GB).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import struct
from concurrent import futures

import numpy as np

from igpt_jax.config import UserError

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ROLES = ("pretrain", "train", "test")

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


class DataError(UserError):
  """A problem with the user's data, explained in one sentence of what to do."""


@dataclasses.dataclass
class ImageSet:
  images: np.ndarray  # [N, H, W, C] uint8
  labels: np.ndarray  # [N] int32; -1 where unlabelled
  class_names: list[str]
  name: str
  skipped_files: list[str] = dataclasses.field(default_factory=list)

  def __len__(self):
    return self.images.shape[0]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def storage_side(resolution: int) -> int:
  return 2 * resolution


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
  """[N, H, W, C'] uint8 -> C channels: RGB -> gray by ITU-R 601 luma, gray -> RGB by copying."""
  if images.ndim == 3:
    images = images[..., None]
  have = images.shape[-1]
  if have == 4:  # RGBA arrays: drop alpha
    images, have = images[..., :3], 3
  if have == channels:
    return images
  if channels == 1 and have == 3:
    luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]
  if channels == 3 and have == 1:
    return np.repeat(images, 3, axis=-1)
  raise DataError(f"Cannot convert {have}-channel images to {channels} channels.")


def from_arrays(images, labels=None, class_names=None, channels=None, name="numpy") -> ImageSet:
  """Wraps in-memory arrays (notebooks, tests). images: [N, H, W(, C)] uint8."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise DataError(f"Images must be uint8 pixels in [0, 255], got dtype {images.dtype}.")
  if channels is not None:
    images = to_channels(images, channels)
  elif images.ndim == 3:
    images = images[..., None]
  labels = np.full(len(images), -1, np.int32) if labels is None else np.asarray(labels, np.int32)
  if class_names is None:
    class_names = [str(i) for i in range(int(labels.max()) + 1)] if labels.size else []
  return ImageSet(images, labels, list(class_names), name)


# -- Fashion-MNIST from IDX files ------------------------------------------------------------

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


FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]


def load_fashion_mnist(directory: str, role: str, channels: int) -> ImageSet:
  prefix = "t10k" if role == "test" else "train"
  images = _read_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"))
  labels = _read_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"))
  return ImageSet(to_channels(images, channels), labels.astype(np.int32),
                  FASHION_MNIST_CLASSES, f"fashion_mnist:{prefix}")


# -- image folders ----------------------------------------------------------------------------

def _decode_file(path: str, channels: int, side: int):
  """Decodes one file to [side, side, C] uint8 (short side resized, centre square), or None."""
  from PIL import Image
  try:
    with Image.open(path) as im:
      im.load()
      im = im.convert("L" if channels == 1 else "RGB")  # grey, RGBA, palette modes alike
      return _centre_square(im, side)
  except Exception:  # noqa: BLE001 - any unreadable file is skipped and reported
    return None


def _in_eval_split(relpath: str, seed: int, eval_fraction: float) -> bool:
  digest = hashlib.sha256(f"{seed}:{relpath}".encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2 ** 64 < eval_fraction


def load_folder(root: str, role: str, channels: int, resolution: int, seed: int = 0,
                eval_fraction: float = 0.1, log=print) -> ImageSet:
  """root/<class>/*.png|jpg|... (labels from folder names) or root/*.png (unlabelled).

  The train/test split is a seeded hash of each file's path, so it never changes as files are
  added. Unreadable files are skipped and each is logged once.
  """
  if not os.path.isdir(root):
    raise DataError(f"Image folder {root!r} does not exist: set --config.data.path to a folder "
                    "of images (root/<class>/*.png).")
  files = []
  for dirpath, _, names in os.walk(root):
    files += [os.path.join(dirpath, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
  files.sort()
  if not files:
    raise DataError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}: point "
                    "--config.data.path at a folder of images.")
  rel = [os.path.relpath(f, root) for f in files]
  class_names = sorted({os.path.dirname(r) for r in rel if os.path.dirname(r)})
  want_eval = role == "test"
  chosen = [(f, r) for f, r in zip(files, rel) if _in_eval_split(r, seed, eval_fraction) == want_eval]
  side = storage_side(resolution)
  with futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    decoded = list(pool.map(lambda fr: _decode_file(fr[0], channels, side), chosen))
  images, labels, skipped = [], [], []
  class_index = {c: i for i, c in enumerate(class_names)}
  for (f, r), arr in zip(chosen, decoded):
    if arr is None:
      skipped.append(f)
      log(f"warning: skipping unreadable image {f}")
      continue
    images.append(arr)
    labels.append(class_index.get(os.path.dirname(r), -1))
  if not images:
    raise DataError(f"None of the {len(chosen)} images for the {role} split of {root!r} could be "
                    "read: check the files are images.")
  if skipped:
    log(f"{len(skipped)} unreadable file(s) skipped in {root!r} ({role} split).")
  return ImageSet(np.stack(images), np.asarray(labels, np.int32), class_names,
                  f"folder:{root}:{role}", skipped)


# -- TFDS -------------------------------------------------------------------------------------

def tfds_split(name: str, role: str) -> str:
  splits = TFDS_SPLITS.get(name, ("train", "train", "test"))
  return splits[ROLES.index(role)]


def load_tfds(name: str, role: str, channels: int, resolution: int, data_dir: str = "",
              log=print) -> ImageSet:
  """Loads a TFDS split into memory (downloading only if the data set is not prepared)."""
  import tensorflow as tf
  import tensorflow_datasets as tfds
  tf.config.set_visible_devices([], "GPU")
  split = tfds_split(name, role)
  try:
    prepared = os.path.isdir(tfds.builder(name, data_dir=data_dir or None).data_dir)
    ds, info = tfds.load(name, split=split, data_dir=data_dir or None, with_info=True,
                         shuffle_files=False, download=not prepared)
    class_names = info.features["label"].names if "label" in info.features else []
  except Exception as e:  # noqa: BLE001
    raise DataError(f"TFDS data set {name!r} (split {split!r}) is not available: {e}. Prepare it "
                    "with `tfds build`, or set --config.data.path to its TFDS data_dir.") from e
  side = storage_side(resolution)
  images, labels, fixed = [], [], True
  for i, ex in enumerate(tfds.as_numpy(ds)):
    img = ex["image"]
    if images and img.shape != images[0].shape:
      fixed = False
    images.append(img)
    labels.append(int(ex.get("label", -1)))
    if (i + 1) % 100_000 == 0:
      log(f"{name}:{split}: read {i + 1} images")
  if not images:
    raise DataError(f"TFDS split {name}:{split} is empty.")
  if fixed:
    stacked = np.stack(images)
  else:  # varying sizes: short side to the storage side, centre square
    stacked = np.stack([_square(img, side) for img in images])
  return ImageSet(to_channels(stacked, channels), np.asarray(labels, np.int32), list(class_names),
                  f"tfds:{name}:{split}")


def _square(img: np.ndarray, side: int) -> np.ndarray:
  from PIL import Image
  return _centre_square(Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img), side)


def _centre_square(im, side: int) -> np.ndarray:
  """A PIL image -> [side, side, C] uint8: short side resized (up or down), centre square."""
  from PIL import Image
  w, h = im.size
  scale = side / min(w, h)
  im = im.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.BICUBIC)
  w, h = im.size
  left, top = (w - side) // 2, (h - side) // 2
  arr = np.asarray(im.crop((left, top, left + side, top + side)), np.uint8)
  return arr.reshape(side, side, 1 if arr.ndim == 2 else arr.shape[-1])


# -- dispatch ---------------------------------------------------------------------------------

def load(config, role: str, log=print) -> ImageSet:
  """The `role` split ('pretrain' | 'train' | 'test') of the configured source."""
  if role not in ROLES:
    raise ValueError(f"role must be one of {ROLES}, got {role!r}")
  d = config.data
  if d.source == "fashion_mnist":
    directory = fashion_mnist_dir(d.path)
    if directory is not None:
      return load_fashion_mnist(directory, role, d.channels)
    log("Fashion-MNIST IDX files not found locally (install Debian's dataset-fashion-mnist or set "
        "$IGPT_DATA_DIR); trying TFDS.")
    return load_tfds("fashion_mnist", role, d.channels, d.resolution, log=log)
  if d.source == "tfds":
    return load_tfds(d.name, role, d.channels, d.resolution, data_dir=d.path, log=log)
  if d.source == "folder":
    return load_folder(d.path, role, d.channels, d.resolution, seed=config.seed, log=log)
  if d.source == "numpy":
    if not d.path or not os.path.exists(d.path):
      raise DataError(f"data.source='numpy' needs --config.data.path to an .npz with "
                      f"train_images/test_images (and _labels); {d.path!r} does not exist.")
    arrays = np.load(d.path)
    split = "test" if role == "test" else "train"
    if f"{split}_images" not in arrays:
      raise DataError(f"{d.path} has no {split}_images array.")
    labels = arrays[f"{split}_labels"] if f"{split}_labels" in arrays else None
    return from_arrays(arrays[f"{split}_images"], labels, channels=d.channels,
                       name=f"numpy:{d.path}:{split}")
  raise DataError(f"Unknown data.source {d.source!r}: use fashion_mnist, tfds, folder or numpy.")
