"""Where images come from: a prepared data set, TFDS, local Fashion-MNIST IDX files, an image
folder, numpy arrays.

Every source yields an `ImageSet`: uint8 images [N, H, W, C] with random access by index
(what lets the pipeline make the example order a pure function of (seed, step)) plus integer
labels. A prepared set (`data.source='prepared'`, made by the prepare stage) is read lazily:
`pread` or ranged reads of the rows asked for, so host memory does not grow with the data set. The other sources
load into memory and suit small data (Fashion-MNIST, CIFAR, a numpy array); prepare anything
larger. Images of varying size (image folders, imagenet2012) are stored at
`storage_side(resolution)` so the random crop still has pixels to choose from -- a folder of
small images at its smallest image's side instead (`folder_side`: nothing is enlarged).

Splits ("roles"): pretrain, train, validation, test. Validation is held out from the source's
train split (a fixed-seed choice of `validation_fraction` of it: the paper held out 4% of
ImageNet and 10% of CIFAR) and is excluded from pretrain and train; test is the source's test
split, for final numbers only. Held-out membership depends on the data alone (`SPLIT_SEED`),
never on `config.seed`: a probe or fine-tune run with another seed must still validate on
images its model was not pretrained on.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import os
import struct
from concurrent import futures

import numpy as np

from igpt_jax import tfimport
from igpt_jax.config import UserError

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ROLES = ("pretrain", "train", "validation", "test")
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


class DataError(UserError):
  """A problem with the user's data, explained in one sentence of what to do."""


@dataclasses.dataclass
class ImageSet:
  images: np.ndarray  # [N, H, W, C] uint8
  labels: np.ndarray  # [N] int32; -1 where unlabelled
  class_names: list[str]
  name: str
  skipped_files: list[str] = dataclasses.field(default_factory=list)
  full_size: bool = False  # decoded from full-size images (the paper's crops apply)

  def __len__(self):
    return self.images.shape[0]

  def subset(self, indices: np.ndarray, name: str) -> "ImageSet":
    """The examples at `indices`: a copy for arrays in memory, a lazy view for prepared sets."""
    indices = np.asarray(indices, np.int64)
    images = (self.images[indices] if type(self.images) is np.ndarray
              else IndexedRows(self.images, indices))
    return dataclasses.replace(self, images=images, labels=self.labels[indices], name=name)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def require_classes(self, stage: str) -> None:
    """Classification (probe, finetune) needs two classes at least; a UserError says what the
    data has instead."""
    if self.num_classes >= 2:
      return
    has = (f"one class ({self.class_names[0]!r})" if self.class_names else "no class labels")
    raise UserError(f"{stage} classifies, which needs 2 classes or more; {self.name} has {has}. "
                    "A folder source takes each subfolder as a class.")


class IndexedRows:
  """rows[indices] of an array-like that reads lazily (a prepared split), without reading."""

  def __init__(self, rows, indices: np.ndarray):
    self.rows, self.indices = rows, indices
    self.shape = (len(indices), *rows.shape[1:])
    self.dtype = rows.dtype

  def __len__(self):
    return self.shape[0]

  def __getitem__(self, index):
    return self.rows[self.indices[index]]


def validation_fraction(config) -> float:
  """data.validation_fraction, or the paper's per data set (4% of ImageNet, 10% otherwise)."""
  fraction = config.data.validation_fraction
  if fraction >= 0:
    return fraction
  d = config.data
  name = d.name if d.source == "tfds" else d.source
  if d.source == "prepared" and d.prepared:
    from igpt_jax.data import prepared
    name = prepared.read_manifest(d.prepared)["source"].removeprefix("tfds:")
  return 0.04 if name in IMAGENET_NAMES else 0.1


SPLIT_SEED = 0  # held-out splits (validation, an image folder's test files); not config.seed


def holdout(n: int, fraction: float, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
  """(train, validation) indices of a train split of n examples: a seeded choice of
  round(fraction * n) for validation, both sorted. Deterministic for (n, fraction, seed)."""
  order = np.random.default_rng([seed, 0x5A11D]).permutation(n)
  k = int(round(fraction * n))
  return np.sort(order[k:]), np.sort(order[:k])


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


def folder_files(root: str, role: str, seed: int = SPLIT_SEED, eval_fraction: float = 0.1):
  """(files, labels, class names) of the `role` split of an image folder: root/<class>/*.png
  (labels from folder names) or root/*.png (unlabelled, label -1). The train/test split is a
  seeded hash of each file's path, so it never changes as files are added."""
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
  class_index = {c: i for i, c in enumerate(class_names)}
  want_eval = role == "test"
  chosen = [(f, class_index.get(os.path.dirname(r), -1)) for f, r in zip(files, rel)
            if _in_eval_split(r, seed, eval_fraction) == want_eval]
  return [f for f, _ in chosen], np.asarray([c for _, c in chosen], np.int32), class_names


def _short_side(path: str) -> int:
  """An image file's short side from its header alone (0 when it cannot be read)."""
  from PIL import Image
  try:
    with Image.open(path) as im:
      return min(im.size)
  except Exception:  # noqa: BLE001 - unreadable: skipped when decoded
    return 0


def folder_side(files: list[str], resolution: int, upsample: bool = False, pool=None,
                where: str = "") -> int:
  """The side a folder's images are stored at: twice the input side (the paper's crops then
  have pixels to choose from), or less -- the smallest image's own short side -- so that no
  image is enlarged on the way. Images smaller than `resolution` are refused (enlarging them
  makes blurred pixels) unless `upsample`; then they are enlarged to the input side."""
  sides = np.asarray(list(pool.map(_short_side, files, chunksize=64)) if pool is not None
                     else [_short_side(f) for f in files], np.int64)
  readable = sides > 0
  if not readable.any():
    return storage_side(resolution)
  small = readable & (sides < resolution)
  if small.any() and not upsample:
    i = int(np.flatnonzero(small)[np.argmin(sides[small])])
    raise DataError(
        f"{int(small.sum())} of the {len(files)} images in {where or 'the folder'} are smaller "
        f"than data.resolution={resolution} (the smallest: {files[i]}, short side {sides[i]} "
        "px): training on them would enlarge them (blurred pixels). Remove them, lower "
        f"--config.data.resolution to at most {int(sides[readable].min())}, or set "
        "--config.data.upsample=True to accept it.")
  return int(min(storage_side(resolution), max(resolution, sides[readable].min())))


def decode_files(files: list[str], channels: int, side: int, pool=None) -> list:
  """Each file -> [side, side, C] uint8, or None where unreadable; in `pool` if given (a
  process pool: PIL decoding holds the GIL)."""
  decode = functools.partial(_decode_file, channels=channels, side=side)
  if pool is None:
    return [decode(f) for f in files]
  return list(pool.map(decode, files, chunksize=16))


def load_folder(root: str, role: str, channels: int, resolution: int, seed: int = SPLIT_SEED,
                eval_fraction: float = 0.1, log=print, upsample: bool = False) -> ImageSet:
  """An image folder's split in memory (see `folder_files`), stored at `folder_side` of the
  whole folder (every split alike); unreadable files are skipped and each is logged once."""
  files, labels, class_names = folder_files(root, role, seed, eval_fraction)
  with futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    side = folder_side(all_folder_files(root), resolution, upsample, pool, repr(root))
    decoded = decode_files(files, channels, side, pool)
  keep = [i for i, arr in enumerate(decoded) if arr is not None]
  skipped = [files[i] for i, arr in enumerate(decoded) if arr is None]
  for f in skipped:
    log(f"warning: skipping unreadable image {f}")
  if not keep:
    raise DataError(f"None of the {len(files)} images for the {role} split of {root!r} could be "
                    "read: check the files are images.")
  if skipped:
    log(f"{len(skipped)} unreadable file(s) skipped in {root!r} ({role} split).")
  if side < storage_side(resolution):
    log(f"{root!r}: images stored at {side}x{side}, the smallest image's side (twice the input "
        f"side, {storage_side(resolution)}, would enlarge it); data.augment=auto crops none.")
  return ImageSet(np.stack([decoded[i] for i in keep]), labels[keep], class_names,
                  f"folder:{root}:{role}", skipped,
                  full_size=side == storage_side(resolution))


def all_folder_files(root: str) -> list[str]:
  """Every image file of a folder, all splits (`folder_files` with everything in one)."""
  return folder_files(root, "train", eval_fraction=0.0)[0]


# -- TFDS -------------------------------------------------------------------------------------

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
                  full_size=full_size)


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


# -- prepared data sets ----------------------------------------------------------------------

def load_prepared(directory: str, split: str, verify: bool = False) -> ImageSet:
  """A split of a prepared data set, read lazily (see `prepared.ShardedRows`). Its shards'
  sizes are checked on open (one stat each); `verify` also checks their sha256 (reads all)."""
  from igpt_jax.data import prepared
  manifest = prepared.read_manifest(directory)
  if split not in manifest["splits"]:
    raise DataError(f"The prepared data set at {directory} has no {split!r} split (it has "
                    f"{', '.join(manifest['splits'])}).")
  info = manifest["splits"][split]
  side, channels = manifest["side"], manifest["channels"]
  prepared.check_shards(directory, info["shards"], (side, side, channels))
  if verify:
    bad = prepared.verify(directory, [split])
    if bad:
      raise DataError(f"The prepared data set at {directory} is damaged: shard(s) "
                      f"{', '.join(bad)} do not match the manifest's sha256. Prepare it again "
                      "(--config.stage=prepare --config.data.overwrite=True).")
  rows = prepared.ShardedRows(directory, info["shards"], (side, side, channels))
  return ImageSet(rows, prepared.read_labels(directory, info["shards"]),
                  manifest["class_names"], f"prepared:{directory}:{split}",
                  skipped_files=info["skipped"], full_size=manifest["full_size"])


def split_seed(config) -> int:
  """The seed of the held-out splits: a prepared set's own (from its manifest), else SPLIT_SEED."""
  if config.data.source == "prepared" and config.data.prepared:
    from igpt_jax.data import prepared
    return int(prepared.read_manifest(config.data.prepared).get("split_seed", SPLIT_SEED))
  return SPLIT_SEED


def check_fits_config(data: ImageSet, config) -> ImageSet:
  """Refuses data a run would silently misuse: other channels than data.channels (bits/dim
  counts them), or images smaller than data.resolution (upsampled: blurred pixels the model
  was never meant to see) unless data.upsample says so."""
  d = config.data
  side, channels = data.images.shape[1], data.images.shape[-1]
  where = (f"the prepared data set at {d.prepared}" if d.source == "prepared" else data.name)
  if channels != d.channels:
    raise DataError(f"{where} has {channels}-channel images but data.channels={d.channels}: "
                    f"set --config.data.channels={channels}, or prepare the set again with "
                    f"--config.data.channels={d.channels}.")
  if min(data.images.shape[1:3]) < d.resolution and not d.upsample:
    hint = (f"prepare it for resolution {d.resolution} (stored side "
            f"{storage_side(d.resolution)} for full-size images)" if d.source == "prepared"
            else "use larger images")
    raise DataError(f"{where} has {side}x{data.images.shape[2]} images but data.resolution="
                    f"{d.resolution} would upsample them (blurred pixels): {hint}, lower "
                    f"--config.data.resolution to at most {min(data.images.shape[1:3])}, or set "
                    "--config.data.upsample=True to accept it.")
  return data


# -- dispatch ---------------------------------------------------------------------------------

def load_split(config, split: str, log=print) -> ImageSet:
  """A whole split of the configured source: 'pretrain' (the split pretraining reads, before
  validation is held out), 'train' or 'test'."""
  d = config.data
  role = "train" if split == "pretrain" and d.source != "tfds" else split
  if d.source == "prepared":
    if not d.prepared:
      raise DataError("data.source='prepared' needs --config.data.prepared=DIR (a directory "
                      "made by --config.stage=prepare).")
    from igpt_jax.data import prepared
    have = prepared.read_manifest(d.prepared)["splits"]
    return load_prepared(d.prepared, split if split in have else role, verify=d.verify)
  if d.source == "fashion_mnist":
    directory = fashion_mnist_dir(d.path)
    if d.path and directory != d.path:  # a path that was given is used or refused
      raise DataError(f"--config.data.path={d.path!r} holds no Fashion-MNIST IDX files "
                      "(train-images-idx3-ubyte.gz ...): point it at the folder that does, or "
                      "leave it empty to use $IGPT_DATA_DIR or Debian's dataset-fashion-mnist.")
    if directory is not None:
      return load_fashion_mnist(directory, role, d.channels)
    log("Fashion-MNIST IDX files not found locally (install Debian's dataset-fashion-mnist or set "
        "$IGPT_DATA_DIR); trying TFDS.")
    return load_tfds("fashion_mnist", role, d.channels, d.resolution, log=log)
  if d.source == "tfds":
    return load_tfds(d.name, split, d.channels, d.resolution, data_dir=d.path, log=log)
  if d.source == "folder":
    return load_folder(d.path, role, d.channels, d.resolution, log=log, upsample=d.upsample)
  if d.source == "numpy":
    if not d.path or not os.path.exists(d.path):
      raise DataError(f"data.source='numpy' needs --config.data.path to an .npz with "
                      f"train_images/test_images (and _labels, class_names); {d.path!r} does "
                      "not exist.")
    arrays = np.load(d.path)
    if f"{role}_images" not in arrays:
      raise DataError(f"{d.path} has no {role}_images array.")
    labels = arrays[f"{role}_labels"] if f"{role}_labels" in arrays else None
    names = [str(n) for n in arrays["class_names"]] if "class_names" in arrays else None
    return from_arrays(arrays[f"{role}_images"], labels, class_names=names, channels=d.channels,
                       name=f"numpy:{d.path}:{role}")
  raise DataError(f"Unknown data.source {d.source!r}: use prepared, fashion_mnist, tfds, folder "
                  "or numpy.")


def _pretrain_is_train(config) -> bool:
  d = config.data
  if d.source == "tfds":
    return tfds_split(d.name, "pretrain") == tfds_split(d.name, "train")
  if d.source == "prepared":
    from igpt_jax.data import prepared
    return "pretrain" not in prepared.read_manifest(d.prepared)["splits"]
  return True


def load(config, role: str, log=print) -> ImageSet:
  """The `role` split ('pretrain' | 'train' | 'validation' | 'test') of the configured source,
  with the validation examples held out of pretrain and train."""
  if role not in ROLES:
    raise ValueError(f"role must be one of {ROLES}, got {role!r}")
  return check_fits_config(_load_role(config, role, log), config)


def _load_role(config, role: str, log) -> ImageSet:
  if role == "test":
    return load_split(config, "test", log)
  fraction = validation_fraction(config)
  if role == "validation" and fraction == 0:
    raise DataError("No validation split: --config.data.validation_fraction is 0.")
  if role == "pretrain" and not _pretrain_is_train(config):
    return load_split(config, "pretrain", log)  # e.g. stl10's unlabelled split
  data = load_split(config, "train", log)
  if fraction == 0:
    return data
  train_idx, val_idx = holdout(len(data), fraction, split_seed(config))
  if role == "validation":
    return data.subset(val_idx, f"{data.name}[validation {fraction:g}]")
  return data.subset(train_idx, f"{data.name}[without validation]")
