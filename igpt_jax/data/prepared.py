"""Prepared data sets: fixed-size uint8 images in raw shards, read by example index.

Layout of a prepared directory (local or gs://):

  prepare.json                  the settings the set is made with (SETTINGS), written first:
                                a later `prepare` resumes only with the same settings
  manifest.json                 those settings, class names, per split its shards (file, count,
                                sha256) and the files it skipped; written last
  <split>-00000.images          uint8 rows [count, side, side, channels], C order, no header
  <split>-00000.labels          int32 little-endian [count] (-1 where unlabelled)
  <split>-00000.keys            the examples' names, one a line (folders: the hold-out keys)
  <split>-00000.done.json       written last for each shard: what makes `prepare` resumable

Why raw fixed-size rows and not ArrayRecord or TFRecord: every example has the same byte size,
so example i of a shard is one read at offset i * row_bytes: locally a `pread` into the batch
buffer (the OS page cache is the only other copy, shared by every process on the host; a memory
map would count every page it faults in, and the pages around it, against each process), remotely
a ranged read. Nothing needs TensorFlow or array_record to read it, there is no per-example decode at
training time, and the training loop's (seed, step) -> examples map stays random access. The
cost is no compression: ImageNet at a 64-pixel storage side is 15.7 GB.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading

import numpy as np

from igpt_jax.config import UserError

MANIFEST = "manifest.json"
SETTINGS_FILE = "prepare.json"
FORMAT = "igpt_jax.prepared/2"
# What a set is made with, and what a run or a resumed `prepare` must match.
SETTINGS = ("format", "source", "side", "channels", "full_size", "shard_size", "split_seed",
            "split_rule")
# How validation is held out of train: a source's SPLIT_RULES entry (data/sources/base.py),
# recorded in the settings. Sets whose examples have names (folders) store them as
# <split>-00000.keys and hold out by them; a set prepared before that holds out by its manifest's
# rule, unchanged.


def _path(directory):
  from igpt_jax import workdir as workdir_lib
  return workdir_lib.path(directory)


def shard_name(split: str, index: int) -> str:
  return f"{split}-{index:05d}"


# -- writing ----------------------------------------------------------------------------------

def write_shard(directory, split: str, index: int, images: np.ndarray, labels: np.ndarray,
                skipped: list[str] = (), source_count: int | None = None,
                keys: list[str] | None = None) -> dict:
  """Writes one shard, images, labels (and keys) first and its .done.json last, each
  atomically: a shard without .done.json is rewritten by the next `prepare`."""
  from igpt_jax import workdir as workdir_lib
  images = np.ascontiguousarray(images, np.uint8)
  labels = np.ascontiguousarray(labels, "<i4")
  if images.ndim != 4 or len(images) != len(labels):
    raise ValueError(f"Shard needs images [n, side, side, C] and n labels, got {images.shape} and "
                     f"{labels.shape}.")
  root, name = _path(directory), shard_name(split, index)
  digest = hashlib.sha256(images.tobytes())
  digest.update(labels.tobytes())
  workdir_lib.write_bytes(root / f"{name}.images", images.tobytes())
  workdir_lib.write_bytes(root / f"{name}.labels", labels.tobytes())
  if keys is not None:
    if len(keys) != len(labels) or any("\n" in k for k in keys):
      raise ValueError(f"Shard {name} needs one key a line per example, got {len(keys)}.")
    blob = "\n".join(keys).encode()
    digest.update(blob)
    workdir_lib.write_bytes(root / f"{name}.keys", blob)
  done = {"name": name, "count": int(len(images)), "sha256": digest.hexdigest(),
          "skipped": list(skipped),
          "source_count": int(len(images) + len(skipped) if source_count is None else source_count)}
  workdir_lib.write_json(root / f"{name}.done.json", done)
  return done


def done_shard(directory, split: str, index: int, source_count: int,
               row_shape: tuple[int, int, int]) -> dict | None:
  """The shard's .done.json record if the shard is whole: it covers `source_count` source
  examples and its files hold exactly its rows; None means (re)write it."""
  root, name = _path(directory), shard_name(split, index)
  path = root / f"{name}.done.json"
  if not path.exists():
    return None
  done = json.loads(path.read_text())
  if done.get("source_count") != source_count or shard_size_problem(root, name, done["count"],
                                                                    row_shape):
    return None
  return done


def shard_size_problem(root, name: str, count: int, row_shape) -> str | None:
  """Why the shard's files are not `count` rows long (a truncated or foreign file), or None."""
  for suffix, row_bytes in ((".images", int(np.prod(row_shape))), (".labels", 4)):
    path = _path(root) / f"{name}{suffix}"
    size = path.stat().length if path.exists() else None
    if size != count * row_bytes:
      return (f"{name}{suffix} is {'missing' if size is None else f'{size} bytes'}, the manifest "
              f"says {count} rows of {row_bytes} bytes")
  return None


def settings(*, source: str, side: int, channels: int, full_size: bool, shard_size: int,
             split_seed: int, split_rule: str | None = None) -> dict:
  """What a set is made with; `split_rule` a SPLIT_RULES text (default: by count, for sets
  whose examples have no names)."""
  if split_rule is None:
    from igpt_jax.data.sources.base import SPLIT_RULES
    split_rule = SPLIT_RULES["permutation"]
  return {"format": FORMAT, "source": source, "side": int(side), "channels": int(channels),
          "full_size": bool(full_size), "shard_size": int(shard_size),
          "split_seed": int(split_seed), "split_rule": split_rule}


def existing_settings(directory) -> dict | None:
  """What the directory was prepared with: its prepare.json, or a manifest's copy; {} for a
  directory that holds shard files of unknown settings; None for an empty or new one."""
  root = _path(directory)
  for name in (SETTINGS_FILE, MANIFEST):
    if (root / name).exists():
      record = json.loads((root / name).read_text())
      return {k: record.get(k) for k in SETTINGS}
  if root.exists() and any(_is_ours(p.name) for p in root.iterdir()):
    return {}
  return None


def _is_ours(name: str) -> bool:
  bare = name.removeprefix(".").removesuffix(".tmp")
  return bare in (MANIFEST, SETTINGS_FILE) or bare.endswith((".images", ".labels", ".keys",
                                                             ".done.json"))


def clear(directory) -> int:
  """Removes every file of a prepared set from the directory (nothing else); how many."""
  root, removed = _path(directory), 0
  if root.exists():
    for p in root.iterdir():
      if _is_ours(p.name):
        p.unlink()
        removed += 1
  return removed


def write_settings(directory, record: dict) -> None:
  from igpt_jax import workdir as workdir_lib
  workdir_lib.write_json(_path(directory) / SETTINGS_FILE, record)


def write_manifest(directory, *, settings_record: dict, class_names: list[str],
                   splits: dict[str, list[dict]]) -> dict:
  """splits: split -> its shards' done records, in order."""
  from igpt_jax import workdir as workdir_lib
  manifest = {
      **settings_record, "class_names": list(class_names),
      "splits": {split: {"count": sum(s["count"] for s in shards),
                         "skipped": [f for s in shards for f in s["skipped"]],
                         "shards": [{k: s[k] for k in ("name", "count", "sha256")} for s in shards]}
                 for split, shards in splits.items()},
  }
  workdir_lib.write_json(_path(directory) / MANIFEST, manifest)
  return manifest


# -- reading ----------------------------------------------------------------------------------

def read_manifest(directory) -> dict:
  path = _path(directory) / MANIFEST
  if not path.exists():
    raise UserError(f"No prepared data set at {directory} ({MANIFEST} missing): run "
                    "`--config.stage=prepare` with this --config.data.prepared first.")
  manifest = json.loads(path.read_text())
  if manifest.get("format") != FORMAT:
    raise UserError(f"{path} is format {manifest.get('format')!r}, expected {FORMAT!r}: "
                    "prepare the data set again with this version (--config.data.overwrite=True).")
  return manifest


def check_shards(directory, shards: list[dict], row_shape) -> None:
  """One stat per file: a truncated or replaced shard stops the run when it opens the set,
  not at the step that first reads past its end."""
  for s in shards:
    problem = shard_size_problem(directory, s["name"], s["count"], row_shape)
    if problem:
      raise UserError(f"The prepared data set at {directory} is damaged: {problem}. Prepare it "
                      "again (--config.stage=prepare --config.data.overwrite=True).")


def coalesce(offsets: np.ndarray, max_ratio: float = 2.0) -> list[tuple[int, int]]:
  """Sorted unique row offsets -> spans [first, end) of rows to read in one request each.

  Neighbouring rows join a span while the span stays within `max_ratio` times the rows it is
  read for, so bytes read per wanted row stay under `max_ratio` x the row size while runs of
  nearby rows (an evaluation pass, a small data set's epoch) become one request."""
  spans: list[tuple[int, int]] = []
  wanted = 0
  for o in offsets.tolist():
    if spans and (o + 1 - spans[-1][0]) <= max_ratio * (wanted + 1):
      spans[-1] = (spans[-1][0], o + 1)
      wanted += 1
    else:
      spans.append((o, o + 1))
      wanted = 1
  return spans


class ShardedRows:
  """The images of one split as an array-like [N, side, side, C]: rows[indices] reads only
  those rows: `pread` locally; remotely (gs://, s3://, any fsspec URL) ranged reads of
  coalesced spans, all of a batch's spans in one `cat_ranges` call (concurrent on gcsfs), so a
  12 KiB row costs ~12 KiB of transfer, not a read-ahead buffer's 512 KiB."""

  def __init__(self, directory, shards: list[dict], shape: tuple[int, int, int]):
    self.url = str(directory).rstrip("/")
    self.local = "://" not in self.url
    self.root = _path(directory) if self.local else None
    self.names = [s["name"] for s in shards]
    self.ends = np.cumsum([s["count"] for s in shards])
    self.row_shape = tuple(shape)
    self.row_bytes = int(np.prod(shape))
    self.shape = (int(self.ends[-1]) if len(self.ends) else 0, *self.row_shape)
    self.dtype = np.dtype(np.uint8)
    self._fds: dict[int, int] = {}
    self._lock = threading.Lock()
    self._fs = None

  def __len__(self):
    return self.shape[0]

  def _read_local(self, shard: int, offsets: np.ndarray) -> np.ndarray:
    if shard not in self._fds:
      with self._lock:  # tf.data reads several steps at once
        if shard not in self._fds:
          self._fds[shard] = os.open(os.fspath(self.root / f"{self.names[shard]}.images"),
                                     os.O_RDONLY)
    out = np.empty((len(offsets), self.row_bytes), np.uint8)
    for i, offset in enumerate(offsets):
      if os.preadv(self._fds[shard], [out[i]], int(offset) * self.row_bytes) != self.row_bytes:
        raise OSError(f"Short read in {self.names[shard]}.images: the prepared data set is "
                      "truncated; prepare it again.")
    return out

  def _filesystem(self):
    if self._fs is None:
      import fsspec
      try:
        self._fs, self._fs_root = fsspec.core.url_to_fs(self.url)
      except ImportError as e:  # gs:// without gcsfs, s3:// without s3fs
        raise UserError(f"Reading {self.url} needs an fsspec backend: {e}") from e
    return self._fs

  def _read_remote(self, groups) -> dict[int, np.ndarray]:
    """{shard: rows [len(offsets), row_bytes]} for [(shard, offsets)]: each shard's wanted rows
    coalesced into spans, every span of the batch in one cat_ranges call."""
    fs = self._filesystem()
    paths, starts, ends, plans = [], [], [], []
    for shard, offsets in groups:
      unique, inverse = np.unique(offsets, return_inverse=True)
      spans = coalesce(unique)
      plans.append((shard, unique, inverse, np.array([f for f, _ in spans]), len(paths)))
      for first, end in spans:
        paths.append(f"{self._fs_root}/{self.names[shard]}.images")
        starts.append(first * self.row_bytes)
        ends.append(end * self.row_bytes)
    blobs = fs.cat_ranges(paths, starts, ends, on_error="raise")
    for path, blob, start, end in zip(paths, blobs, starts, ends):
      if len(blob) != end - start:
        raise OSError(f"Short read in {path}: the prepared data set is truncated; prepare it "
                      "again.")
    out = {}
    for shard, unique, inverse, firsts, base in plans:
      span = np.searchsorted(firsts, unique, side="right") - 1
      sizes = [(ends[base + j] - starts[base + j]) // self.row_bytes for j in range(len(firsts))]
      block = np.frombuffer(b"".join(blobs[base:base + len(firsts)]), np.uint8)
      block = block.reshape(-1, self.row_bytes)
      within = np.concatenate([[0], np.cumsum(sizes)[:-1]])[span] + (unique - firsts[span])
      out[shard] = block[within][inverse]
    return out

  def __getitem__(self, index) -> np.ndarray:
    if isinstance(index, slice):
      index = np.arange(*index.indices(len(self)))
    index = np.asarray(index, np.int64)
    scalar = index.ndim == 0
    index = index.reshape(-1)
    if index.size and (index.min() < 0 or index.max() >= len(self)):
      raise IndexError(f"Index out of range for {len(self)} rows.")
    shard = np.searchsorted(self.ends, index, side="right")
    offset = index - np.where(shard > 0, self.ends[np.maximum(shard - 1, 0)], 0)
    out = np.empty((len(index), self.row_bytes), np.uint8)
    groups = [(int(s), np.flatnonzero(shard == s)) for s in np.unique(shard)]
    if self.local:
      for s, where in groups:
        out[where] = self._read_local(s, offset[where])
    else:
      rows = self._read_remote([(s, offset[where]) for s, where in groups])
      for s, where in groups:
        out[where] = rows[s]
    out = out.reshape(-1, *self.row_shape)
    return out[0] if scalar else out


def read_keys(directory, shards: list[dict]) -> np.ndarray | None:
  """The examples' names in order, or None when the shards have none."""
  root = _path(directory)
  parts = []
  for s in shards:
    path = root / f"{s['name']}.keys"
    if not path.exists():
      return None
    text = path.read_text()
    parts += text.split("\n") if text else []
  return np.asarray(parts)


def read_labels(directory, shards: list[dict]) -> np.ndarray:
  root = _path(directory)
  parts = [np.frombuffer((root / f"{s['name']}.labels").read_bytes(), "<i4") for s in shards]
  return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)


def verify(directory, splits=None) -> list[str]:
  """Names of the shards (of `splits`, default all) whose bytes do not match the manifest's
  sha256 (reads them all)."""
  manifest = read_manifest(directory)
  root, bad = _path(directory), []
  for split, info in manifest["splits"].items():
    if splits is not None and split not in splits:
      continue
    for s in info["shards"]:
      digest = hashlib.sha256((root / f"{s['name']}.images").read_bytes())
      digest.update((root / f"{s['name']}.labels").read_bytes())
      if (root / f"{s['name']}.keys").exists():
        digest.update((root / f"{s['name']}.keys").read_bytes())
      if digest.hexdigest() != s["sha256"]:
        bad.append(s["name"])
  return bad
