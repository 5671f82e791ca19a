"""Stage prepare: the configured source -> a prepared data set at data.prepared (see prepared.py).

Runs on one process and uses the host's cores for decoding (a process pool for image folders,
tf.data's parallel map for TFDS). Work is cut into shards of data.shard_size source examples;
each finished shard is recorded by its .done.json, so a rerun after a crash or a preemption
skips the shards already written and produces the same manifest as an uninterrupted run.
Unreadable files are skipped, counted and named in the manifest.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from concurrent import futures

import numpy as np

from igpt_jax.data import prepared, sources
from igpt_jax.data.sources import DataError


class _Split:
  """count source examples, and read(lo, hi) -> (images, labels, skipped files)."""

  def __init__(self, count, read):
    self.count, self.read = count, read


def _plan(config, pool, log):
  """(source description, side, full_size, class names, {split: _Split}) of the configured
  source. Validation is not a stored split: it is held out of train when read."""
  d = config.data
  if d.source == "prepared":
    raise DataError("data.source='prepared' is already prepared: set data.source to the "
                    "original (tfds, folder, numpy, fashion_mnist) to prepare it.")
  if d.source == "folder":
    side, out = sources.storage_side(d.resolution), {}
    class_names = []
    for split in ("train", "test"):
      files, labels, class_names = sources.folder_files(d.path, split)

      def read(lo, hi, files=files, labels=labels):
        decoded = sources.decode_files(files[lo:hi], d.channels, side, pool)
        keep = [i for i, arr in enumerate(decoded) if arr is not None]
        images = (np.stack([decoded[i] for i in keep]) if keep
                  else np.zeros((0, side, side, d.channels), np.uint8))
        return images, labels[lo:hi][keep], [files[lo + i] for i, a in enumerate(decoded) if a is None]

      out[split] = _Split(len(files), read)
    return f"folder:{d.path}", side, True, class_names, out
  if d.source == "tfds":
    builder = sources.tfds_builder(d.name, d.path, log)
    class_names, full_size = sources.tfds_info(builder)
    side = sources.storage_side(d.resolution) if full_size else builder.info.features["image"].shape[0]
    out = {}
    for role in ("pretrain", "train", "test"):
      split = sources.tfds_split(d.name, role)
      if role == "pretrain" and split == sources.tfds_split(d.name, "train"):
        continue
      out[role] = _Split(builder.info.splits[split].num_examples,
                         lambda lo, hi, split=split: (*sources.read_tfds(
                             builder, split, lo, hi, d.channels, side), []))
    return f"tfds:{d.name}", side, full_size, class_names, out
  # In-memory sources (numpy, fashion_mnist): stored at their own size.
  out, side, class_names = {}, None, []
  for split in ("train", "test"):
    data = sources.load_split(config, split, log)
    side, class_names = data.images.shape[1], data.class_names
    if data.images.shape[1] != data.images.shape[2]:
      raise DataError(f"{data.name} has non-square images {data.images.shape[1:3]}; use an "
                      "image folder source to centre-crop them.")
    out[split] = _Split(len(data), lambda lo, hi, data=data: (data.images[lo:hi],
                                                                data.labels[lo:hi], []))
  return d.source + (f":{d.path}" if d.path else ""), side, False, class_names, out


def run(config, workdir=None, log=print) -> dict:
  del workdir  # a prepared set lives at data.prepared, shared by runs
  d = config.data
  if not d.prepared:
    raise DataError("The prepare stage writes to --config.data.prepared=DIR (local or gs://); "
                    "set it.")
  workers = d.workers or os.cpu_count() or 1
  start_time = time.perf_counter()
  # spawn, not fork: this process may already run JAX or TF threads.
  with futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
    source, side, full_size, class_names, splits = _plan(config, pool, log)
    log(f"Preparing {source} into {d.prepared}: splits "
        + ", ".join(f"{k} ({v.count} examples)" for k, v in splits.items())
        + f", stored at {side}x{side}x{d.channels}, {workers} decoding workers.")
    records = {}
    for split, part in splits.items():
      records[split] = _prepare_split(d.prepared, split, part, d.shard_size, log)
  manifest = prepared.write_manifest(d.prepared, source=source, side=side, channels=d.channels,
                                     full_size=full_size, class_names=class_names, splits=records)
  counts = {k: v["count"] for k, v in manifest["splits"].items()}
  skipped = {k: len(v["skipped"]) for k, v in manifest["splits"].items()}
  log(f"Prepared {counts} ({skipped} unreadable files skipped) in "
      f"{time.perf_counter() - start_time:.1f} s: {d.prepared}/{prepared.MANIFEST}")
  return {"stage": "prepare", "prepared": str(d.prepared), "source": source, "side": side,
          "full_size": full_size, "examples": counts, "skipped": skipped}


def _prepare_split(directory, split: str, part: _Split, shard_size: int, log) -> list[dict]:
  num_shards = max(math.ceil(part.count / shard_size), 1)
  records, written, begin = [], 0, time.perf_counter()
  for j in range(num_shards):
    done = prepared.done_shard(directory, split, j)
    if done is None:
      lo, hi = j * shard_size, min((j + 1) * shard_size, part.count)
      images, labels, skipped = part.read(lo, hi)
      for f in skipped:
        log(f"warning: skipping unreadable image {f}")
      done = prepared.write_shard(directory, split, j, images, labels, skipped)
      written += hi - lo
      rate = written / max(time.perf_counter() - begin, 1e-9)
      remaining = part.count - min((j + 1) * shard_size, part.count)
      log(f"{split}: shard {j + 1}/{num_shards}, {rate:.0f} images/s, "
          f"ETA {remaining / max(rate, 1e-9):.0f} s")
    elif j == 0 or j == num_shards - 1:
      log(f"{split}: shard {j + 1}/{num_shards} already prepared")
    records.append(done)
  return records
