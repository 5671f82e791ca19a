"""What every data source shares: the in-memory (or lazily read) `ImageSet`, the `Source`
interface each `data.source` implements, and the helpers of splits and pixels.

Splits ("roles"): pretrain, train, validation, test. Validation is held out from the source's
train split (a fixed-seed choice of `validation_fraction` of it: the paper held out 4% of
ImageNet and 10% of CIFAR) and is excluded from pretrain and train; test is the source's test
split, for final numbers only. Held-out membership depends on the data alone (`SPLIT_SEED`),
never on `config.seed`: a probe or fine-tune run with another seed must still validate on
images its model was not pretrained on.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

import numpy as np

from igpt_jax.config import UserError

ROLES = ("pretrain", "train", "validation", "test")
SPLIT_SEED = 0  # held-out splits (validation, an image folder's test files); not config.seed


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
  # The side files were decoded to (short side resized, centre square); 0: arrays stored as
  # given. An export's image processor does the same to a user's image.
  decoded_side: int = 0
  # Each example's name where it has one (a folder's file path under its split folder): the
  # validation hold-out then hashes it, so adding or losing a file moves only that file.
  keys: np.ndarray | None = None

  def __len__(self):
    return self.images.shape[0]

  def subset(self, indices: np.ndarray, name: str) -> "ImageSet":
    """The examples at `indices`: a copy for arrays in memory, a lazy view for prepared sets."""
    indices = np.asarray(indices, np.int64)
    images = (self.images[indices] if type(self.images) is np.ndarray
              else IndexedRows(self.images, indices))
    return dataclasses.replace(self, images=images, labels=self.labels[indices], name=name,
                               keys=None if self.keys is None else self.keys[indices])

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


@dataclasses.dataclass
class StoredSplit:
  """A split as `prepare` stores it: its source examples' count, and random access to them:
  read(lo, hi) -> (uint8 images, int32 labels, names of the examples that did not decode);
  where examples have names (`names`, as `read` reports them) and hold-out keys (`keys`), both
  in source order."""
  count: int
  read: Callable
  names: list[str] | None = None
  keys: list[str] | None = None


@dataclasses.dataclass
class Layout:
  """A source as `prepare` stores it: its description (the manifest's `source`), stored side,
  whether its images are full-size photos, class names and stored splits (validation is not
  one: it is held out of train when read)."""
  description: str
  side: int
  full_size: bool
  class_names: list[str]
  splits: dict[str, StoredSplit]


class Source:
  """One kind of data: a subclass per `data.source` value (`name`), looked up in the registry
  (sources.SOURCES). It says how its stored splits serve the roles, how validation is held out,
  and reads its splits: whole, for the loaders (`load_split`), or by rows, for `prepare`
  (`layout`)."""
  name: ClassVar[str] = ""
  # The config fields that name a source's data: a resumed pretraining must keep them.
  defining_fields: ClassVar[tuple[str, ...]] = ("data.source", "data.path")

  def __init__(self, config, log=print):
    self.config, self.d, self.log = config, config.data, log

  def has_pretrain_split(self) -> bool:
    """Whether pretraining reads a split of its own (stl10's unlabelled) instead of train."""
    return False

  def validation_fraction(self) -> float:
    """The paper's share of train held out for validation when data.validation_fraction is -1:
    4% of ImageNet, 10% otherwise."""
    return 0.1

  def split_seed(self) -> int:
    return SPLIT_SEED

  def split_rule(self) -> str:
    """SPLIT_RULES' name of how this source holds validation out (keyed: by example names)."""
    return "permutation"

  def load_split(self, split: str) -> ImageSet:
    """A whole stored split: 'pretrain' (only where `has_pretrain_split`), 'train' or 'test'."""
    raise NotImplementedError

  def layout(self, pool) -> Layout:
    """The source as `prepare` stores it; by default its splits in memory, at their own size
    (sources that decode files or read TFDS read by rows, in `pool`)."""
    splits, side, class_names = {}, None, []
    for split in ("train", "test"):
      data = self.load_split(split)
      side, class_names = data.images.shape[1], data.class_names
      if data.images.shape[1] != data.images.shape[2]:
        raise DataError(f"{data.name} has non-square images {data.images.shape[1:3]}; use an "
                        "image folder source to centre-crop them.")
      splits[split] = StoredSplit(len(data), lambda lo, hi, data=data: (
          data.images[lo:hi], data.labels[lo:hi], []))
    return Layout(self.d.source + (f":{self.d.path}" if self.d.path else ""), side, False,
                  class_names, splits)

  def prepared_on_first_use(self):
    """The config of a TFDS set to prepare once and then read as a prepared set (so that host
    memory does not grow with the data set), or None: read as it is."""
    return None

  def where(self, data: ImageSet) -> str:
    """The data as messages name it."""
    return data.name

  def too_small_hint(self) -> str:
    return "use larger images"

  @classmethod
  def describe(cls, data: dict) -> str:
    """What a run trained on, from its saved config's `data` section (the model card)."""
    return f"{cls.name} `{data['path']}`" if data.get("path") else cls.name


# How validation is held out of train, recorded in checkpoints (and a prepared set's manifest):
# a run resumed under another rule would train on what it validated on.
SPLIT_RULES = {
    "permutation": ("validation: holdout(n, fraction, split_seed) of train; folder test: "
                    "sha256(f'{split_seed}:{relpath}') < 0.1"),
    "keyed": ("validation: sha256(f'{split_seed}:validation:{key}') < fraction of train, key = "
              "the file's path under its split folder; folder test: "
              "sha256(f'{split_seed}:{relpath}') < 0.1"),
}


def hashed_below(text: str, fraction: float) -> bool:
  """Whether sha256(text), read as a number in [0, 1), is below `fraction`: a membership that
  depends on the text alone (a folder's test files, keyed validation)."""
  import hashlib
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64 < fraction


def holdout_keyed(keys: np.ndarray, fraction: float,
                  seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
  """(train, validation) indices by a hash of each example's key: membership is the key's
  alone (about `fraction` of them), so one more or one fewer file changes one membership."""
  held = np.asarray([hashed_below(f"{seed}:validation:{k}", fraction) for k in keys], bool)
  return np.flatnonzero(~held), np.flatnonzero(held)


def holdout(n: int, fraction: float, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
  """(train, validation) indices of a train split of n examples: a seeded choice of
  round(fraction * n) for validation, both sorted. Deterministic for (n, fraction, seed); for
  data sets of a fixed size (a key-less ImageSet)."""
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
