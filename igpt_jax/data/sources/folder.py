"""data.source='folder': an image folder, root/<class>/*.png (labels from folder names) or
root/*.png (unlabelled). Test files are a seeded hash of each file's path (a stable 10%), so
the split never changes as files are added. Images of varying size are stored at
`folder_side`: twice the input side (the paper's crops then have pixels to choose from), or
the smallest image's own short side, so that nothing is enlarged."""

from __future__ import annotations

import functools
import os
from concurrent import futures

import numpy as np

from igpt_jax.data.sources.base import (SPLIT_SEED, DataError, ImageSet, Layout, Source,
                                        StoredSplit, hashed_below, storage_side)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# A folder this big is ImageNet-sized: the paper's 4% of train is held out for validation
# (ImageNet's 1.28M images give ~51k), not the 10% of smaller sets.
IMAGENET_SIZED = 1_000_000


class Folder(Source):
  name = "folder"

  def split_rule(self) -> str:
    return "keyed"  # by each file's path: files come and go

  def validation_fraction(self) -> float:
    return 0.04 if self._train_files >= IMAGENET_SIZED else 0.1

  @functools.cached_property
  def _train_files(self) -> int:
    return len(folder_files(self.d.path, "train")[0])

  def load_split(self, split: str) -> ImageSet:
    d = self.d
    return load_folder(d.path, split, d.channels, d.resolution, log=self.log,
                       upsample=d.upsample)

  def layout(self, pool) -> Layout:
    d = self.d
    side = folder_side(all_folder_files(d.path), d.resolution, d.upsample, pool, repr(d.path))
    splits, class_names = {}, []
    for split in ("train", "test"):
      files, labels, class_names = folder_files(d.path, split)

      def read(lo, hi, files=files, labels=labels):
        decoded = decode_files(files[lo:hi], d.channels, side, pool)
        keep = [i for i, arr in enumerate(decoded) if arr is not None]
        images = (np.stack([decoded[i] for i in keep]) if keep
                  else np.zeros((0, side, side, d.channels), np.uint8))
        return images, labels[lo:hi][keep], [files[lo + i] for i, a in enumerate(decoded)
                                             if a is None]

      splits[split] = StoredSplit(len(files), read, files,
                                  split_keys(d.path, "test" if split == "test" else "train", files))
    return Layout(f"folder:{d.path}", side, side == storage_side(d.resolution), class_names,
                  splits)


def _decode_file(path: str, channels: int, side: int):
  """Decodes one file to [side, side, C] uint8 (short side resized, centre square), or None."""
  from PIL import Image
  try:
    with Image.open(path) as im:
      im.load()
      im = im.convert("L" if channels == 1 else "RGB")  # grey, RGBA, palette modes alike
      return centre_square(im, side)
  except Exception:  # noqa: BLE001 - any unreadable file is skipped and reported
    return None


def centre_square(im, side: int) -> np.ndarray:
  """A PIL image -> [side, side, C] uint8: short side resized (up or down), centre square."""
  from PIL import Image
  w, h = im.size
  scale = side / min(w, h)
  im = im.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.BICUBIC)
  w, h = im.size
  left, top = (w - side) // 2, (h - side) // 2
  arr = np.asarray(im.crop((left, top, left + side, top + side)), np.uint8)
  return arr.reshape(side, side, 1 if arr.ndim == 2 else arr.shape[-1])


def _in_eval_split(relpath: str, seed: int, eval_fraction: float) -> bool:
  return hashed_below(f"{seed}:{relpath}", eval_fraction)


# Folders a data set laid out by split uses (ImageNet's train/ and val/): its test split is
# the first of TEST_FOLDERS there; validation is held out of train as for any source.
TRAIN_FOLDER, TEST_FOLDERS = "train", ("test", "val", "validation")


def split_layout(root: str) -> dict[str, str] | None:
  """{'train': root/train, 'test': root/test (or val)} for a folder laid out by split, whose
  only subfolders are train/ and test/ or val/; None for a folder of classes."""
  subdirs = {d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))}
  tests = [d for d in TEST_FOLDERS if d in subdirs]
  if TRAIN_FOLDER not in subdirs or not tests or subdirs - {TRAIN_FOLDER, *TEST_FOLDERS}:
    return None
  if len(tests) > 1:  # not silently: one of them would go unread
    raise DataError(f"{root!r} has {', '.join(f'{d}/' for d in tests)} beside train/: the test "
                    "split is one folder (validation is held out of train); keep one of them.")
  return {"train": os.path.join(root, TRAIN_FOLDER), "test": os.path.join(root, tests[0])}


def _existing(root: str) -> str:
  if not os.path.isdir(root):
    raise DataError(f"Image folder {root!r} does not exist: set --config.data.path to a folder "
                    "of images (root/<class>/*.png).")
  return root


def _image_files(root: str) -> list[str]:
  """The image files under `root`, sorted; one error line when there are none."""
  files = []
  for dirpath, _, names in os.walk(root):
    files += [os.path.join(dirpath, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
  if not files:
    raise DataError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}: point "
                    "--config.data.path at a folder of images.")
  return sorted(files)


def folder_files(root: str, role: str, seed: int = SPLIT_SEED, eval_fraction: float = 0.1):
  """(files, labels, class names) of the `role` split of an image folder: root/<class>/*.png
  (labels from folder names) or root/*.png (unlabelled, label -1). The train/test split is a
  seeded hash of each file's path, so it never changes as files are added -- unless the folder
  is laid out by split (`split_layout`: root/train/<class>, root/val/<class>), whose folders
  are the splits, with train's classes."""
  layout = split_layout(_existing(root))
  if layout:
    base = layout["test" if role == "test" else "train"]
    files = _image_files(base)
    class_names = sorted(d for d in os.listdir(layout["train"])
                         if os.path.isdir(os.path.join(layout["train"], d)))
    rel = [os.path.relpath(f, base) for f in files]
    unknown = sorted({os.path.dirname(r) for r in rel} - set(class_names) - {""})
    if unknown:
      raise DataError(f"{base!r} has class folder(s) train/ does not: {', '.join(unknown[:5])}; "
                      "a split's classes must be train's.")
    class_index = {c: i for i, c in enumerate(class_names)}
    return files, np.asarray([class_index.get(os.path.dirname(r), -1) for r in rel],
                             np.int32), class_names
  files = _image_files(root)
  rel = [os.path.relpath(f, root) for f in files]
  class_names = sorted({os.path.dirname(r) for r in rel if os.path.dirname(r)})
  class_index = {c: i for i, c in enumerate(class_names)}
  want_eval = role == "test"
  chosen = [(f, class_index.get(os.path.dirname(r), -1)) for f, r in zip(files, rel)
            if _in_eval_split(r, seed, eval_fraction) == want_eval]
  return [f for f, _ in chosen], np.asarray([c for _, c in chosen], np.int32), class_names


def split_keys(root: str, role: str, files: list[str]) -> list[str]:
  """The files' hold-out keys: each one's path under the folder (under its split folder for a
  folder laid out by split), with '/' on every system."""
  layout = split_layout(root)
  base = (layout["test"] if role == "test" else layout["train"]) if layout else root
  return [os.path.relpath(f, base).replace(os.sep, "/") for f in files]


def all_folder_files(root: str) -> list[str]:
  """Every image file of a folder, all splits."""
  return _image_files(_existing(root))


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
  keys = np.asarray(split_keys(root, role, [files[i] for i in keep]))
  return ImageSet(np.stack([decoded[i] for i in keep]), labels[keep], class_names,
                  f"folder:{root}:{role}", skipped,
                  full_size=side == storage_side(resolution), decoded_side=side, keys=keys)

