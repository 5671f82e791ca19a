"""Stage prepare: the configured source -> a prepared data set at data.prepared (see prepared.py).

Runs on one process and uses the host's cores for decoding (a process pool for image folders,
tf.data's parallel map for TFDS). Work is cut into shards of data.shard_size source examples;
each finished shard is recorded by its .done.json, so a rerun after a crash or a preemption
skips the shards already written and produces the same manifest as an uninterrupted run.
Unreadable files are skipped, counted and named in the manifest.

The settings a set is made with (source, stored side, channels, shard size, split rule) are
written to prepare.json before the first shard. A rerun resumes only with the same settings; a
directory made with others is refused in one line and left as it is, unless
--config.data.overwrite=True, which removes the old set's files and starts over.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from concurrent import futures

from igpt_jax import distributed
from igpt_jax import workdir as workdir_lib
from igpt_jax.data import prepared, sources
from igpt_jax.data.sources import DataError
from igpt_jax.data.sources.base import StoredSplit


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
    layout = sources.source_of(config, log).layout(pool)
    source, side, splits = layout.description, layout.side, layout.splits
    keyed = all(part.keys is not None for part in splits.values())
    record = prepared.settings(source=source, side=side, channels=d.channels,
                               full_size=layout.full_size, shard_size=d.shard_size,
                               split_seed=sources.SPLIT_SEED, split_rule=sources.SPLIT_RULES[
                                   "keyed" if keyed else "permutation"])
    _claim_directory(d.prepared, record, d.overwrite, log)
    log(f"Preparing {source} into {d.prepared}: splits "
        + ", ".join(f"{k} ({v.count} examples)" for k, v in splits.items())
        + f", stored at {side}x{side}x{d.channels}, {workers} decoding workers.")
    records = {}
    try:
      for split, part in splits.items():
        records[split] = _prepare_split(d.prepared, split, part, d.shard_size,
                                        (side, side, d.channels), log)
      manifest = prepared.write_manifest(d.prepared, settings_record=record,
                                         class_names=layout.class_names, splits=records)
    except OSError as e:  # disk full, quota, permissions, a bucket that went away
      raise DataError(f"Preparing {d.prepared} failed: "
                      f"{e.strerror or e} ({getattr(e, 'filename', None) or 'a shard'}). Finished "
                      "shards are kept and no partial file is left: fix that and run the same "
                      "prepare again to resume.") from e
  counts = {k: v["count"] for k, v in manifest["splits"].items()}
  skipped = {k: len(v["skipped"]) for k, v in manifest["splits"].items()}
  log(f"Prepared {counts} ({skipped} unreadable files skipped) in "
      f"{time.perf_counter() - start_time:.1f} s: {d.prepared}/{prepared.MANIFEST}")
  return {"stage": "prepare", "prepared": str(d.prepared), "source": source, "side": side,
          "full_size": layout.full_size, "examples": counts, "skipped": skipped}


def _claim_directory(directory, record: dict, overwrite: bool, log) -> None:
  """Writes prepare.json, or checks the one there: resume only what these settings made;
  data.overwrite removes a set that is there and starts over."""
  have = prepared.existing_settings(directory)
  if have is not None and overwrite:
    log(f"data.overwrite: removing the {prepared.clear(directory)} files of the set prepared "
        f"in {directory}; starting over.")
  elif have is not None and have != record:
    if not have:
      raise DataError(f"{directory} already holds prepared shards of unknown settings (no "
                      f"{prepared.SETTINGS_FILE}): prepare into an empty directory, or add "
                      "--config.data.overwrite=True to remove them and start over.")
    diff = ", ".join(f"{k} {have.get(k)!r} there vs {record[k]!r} now"
                     for k in prepared.SETTINGS if have.get(k) != record[k])
    raise DataError(f"{directory} was prepared with other settings ({diff}); nothing was "
                    "changed. Prepare into another directory, or add "
                    "--config.data.overwrite=True to remove that set and start over.")
  prepared.write_settings(directory, record)


def _prepare_split(directory, split: str, part: StoredSplit, shard_size: int, row_shape,
                   log) -> list[dict]:
  num_shards = max(math.ceil(part.count / shard_size), 1)
  records, written, begin = [], 0, time.perf_counter()
  for j in range(num_shards):
    lo, hi = j * shard_size, min((j + 1) * shard_size, part.count)
    done = prepared.done_shard(directory, split, j, hi - lo, row_shape)
    if done is None:
      # A stop between shards keeps every finished one; the same command resumes after them.
      distributed.PREEMPTION.raise_if_requested("prepare", prepared=str(directory))
      images, labels, skipped = part.read(lo, hi)
      for f in skipped:
        log(f"warning: skipping unreadable image {f}")  # a file, or a TFDS example
      keys = None
      if part.keys is not None:  # the kept examples' names: the hold-out hashes them
        lost = set(skipped)
        keys = [k for n, k in zip(part.names[lo:hi], part.keys[lo:hi]) if n not in lost]
      done = prepared.write_shard(directory, split, j, images, labels, skipped, hi - lo, keys)
      written += hi - lo
      rate = written / max(time.perf_counter() - begin, 1e-9)
      remaining = part.count - min((j + 1) * shard_size, part.count)
      log(f"{split}: shard {j + 1}/{num_shards}, {rate:.0f} images/s, "
          f"ETA {remaining / max(rate, 1e-9):.0f} s")
    elif j == 0 or j == num_shards - 1:
      log(f"{split}: shard {j + 1}/{num_shards} already prepared")
    records.append(done)
  return records


# -- prepare on first use ---------------------------------------------------------------------

def cache_dir(config, workdir) -> str:
  """Where a TFDS source is prepared on first use: data.prepared when set (share it between
  runs: a local path or gs://), else under the workdir, named by what the set depends on."""
  d = config.data
  if d.prepared:
    return d.prepared
  name = f"{d.name.replace('/', '_')}-{d.resolution}px-{d.channels}ch"
  return str(workdir_lib.path(workdir) / "prepared" / name)


def resolved(config, workdir, log=print, poll_s: float = 10.0):
  """The config a stage reads its data with. A TFDS source is prepared on first use -- once, by
  process 0, into `cache_dir`; the other processes wait for its manifest -- and then read as a
  prepared set: each process reads only its batches' rows, so host memory does not grow with
  the data set (loading imagenet_resized/32x32 whole would hold 1.28M images per process).
  Other sources are returned as they are."""
  out = sources.source_of(config, log).prepared_on_first_use()
  if out is None:
    return config
  out.data.prepared = directory = cache_dir(out, workdir)
  manifest = workdir_lib.path(directory) / prepared.MANIFEST
  if not manifest.exists():
    if distributed.is_chief():
      log(f"TFDS {out.data.name}: preparing it once into {directory} (later runs with "
          f"--config.data.prepared={directory} skip this).")
      run(out, log=log)
    else:
      waited = 0.0
      while not manifest.exists():
        distributed.PREEMPTION.raise_if_requested("prepare", prepared=str(directory))
        if waited and waited % 300 < poll_s:
          log(f"Waiting for process 0 to prepare {directory} ({waited / 60:.0f} min).")
        time.sleep(poll_s)
        waited += poll_s
    distributed.barrier("prepare_on_first_use")
  have = prepared.read_manifest(directory)
  if have["source"] != f"tfds:{out.data.name}":
    raise DataError(f"data.prepared={directory} holds {have['source']}, not tfds:"
                    f"{out.data.name}: point data.prepared elsewhere (or at nothing, to "
                    "prepare under the workdir).")
  out.data.source = "prepared"
  return out
