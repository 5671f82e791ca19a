"""Probe features on disk: extracted under the training mesh, streamed to the workdir, read back
a chunk at a time.

A store is a folder of chunks `r<lo>-c<chunk>`: one file per group (layer), `.g<group>.npz`
with that group's [rows, dim] features (float16; uint8 for pixels), and the chunk's [rows]
labels once, `.labels.npy` (-1 marks padding; written last: it marks the chunk whole), so a
fit that reads one layer, or only the labels, reads only those bytes; plus `meta.json`, written
last and removed first when an extraction starts again (a store being written never reads back
as complete), and a progress file per row range that lets a stopped extraction resume. Every
process writes the rows its devices hold of each global batch (`lo` names that row range, so
processes holding replicas of the same rows write once), and nothing holds more than two chunks
(one collected, one being written): host memory is bounded by `chunk_bytes`, whatever the number of examples. A probe on the same
mesh reads back its own row range; the in-memory path reads every range.
"""

from __future__ import annotations

import io
import json

import jax
import numpy as np
from etils import epath

from igpt_jax import workdir as workdir_lib

FORMAT = "igpt_jax.features/2"  # /1 kept every group of a chunk in one file


def _host_part(array, rows: np.ndarray, axis: int) -> np.ndarray:
  """`rows` (sorted) along `axis` of a global array, from this process's shards only."""
  pieces = {}
  for shard in array.addressable_shards:
    start, stop, _ = shard.index[axis].indices(array.shape[axis])
    pieces.setdefault(start, (stop, shard.data))
  held_rows = np.concatenate([np.arange(s, pieces[s][0]) for s in sorted(pieces)])
  held = np.concatenate([np.asarray(pieces[s][1]) for s in sorted(pieces)], axis=axis)
  return np.take(held, np.searchsorted(held_rows, rows), axis=axis)


class Store:
  """Reads a finished store: its meta, and its chunks one at a time."""

  def __init__(self, path):
    self.path = epath.Path(path)
    self.meta = json.loads((self.path / "meta.json").read_text())
    if self.meta.get("format") != FORMAT:
      raise ValueError(f"{self.path} is not a feature store ({FORMAT}).")

  @staticmethod
  def complete(path, key: dict) -> bool:
    """True when `path` holds a finished store made for `key` (model step, data, layers...)."""
    meta = epath.Path(path) / "meta.json"
    if not meta.exists():
      return False
    meta = json.loads(meta.read_text())
    return meta.get("format") == FORMAT and meta.get("key") == key

  @property
  def groups(self) -> int:
    return self.meta["groups"]

  @property
  def dim(self) -> int:
    return self.meta["dim"]

  @property
  def num_examples(self) -> int:
    return self.meta["num_examples"]

  def chunk_names(self, ranges=None) -> list[str]:
    """Chunk files of the given row ranges (`lo` values; default all), in order."""
    ranges = self.ranges() if ranges is None else ranges
    return [name for r in ranges for name in self.meta["ranges"][str(r)]["chunks"]]

  def ranges(self) -> list[int]:
    """The row ranges (first row of each process's part of a batch) that wrote chunks."""
    return sorted(int(r) for r in self.meta["ranges"])

  def rows(self, lo: int) -> int:
    """Rows written for one range, padding included (the same for every range)."""
    return self.meta["ranges"][str(lo)]["rows"]

  def read(self, name: str, view=None) -> tuple[np.ndarray, np.ndarray]:
    """One chunk: features [rows, G, D] (float32; uint8 pixels as stored) and labels [rows]
    (-1 = padding). `view`
    (a list of layer groups) concatenates groups: -> [rows, len(view), sum of dims]."""
    y = self.chunk_labels(name)
    wanted = range(self.groups) if view is None else sorted({g for group in view for g in group})
    parts = {g: self._group(name, g) for g in wanted}
    if view is None:
      return np.stack([parts[g] for g in wanted], axis=1), y
    return np.stack([np.concatenate([parts[g] for g in group], -1) for group in view], 1), y

  def _group(self, name: str, group: int) -> np.ndarray:
    with np.load(io.BytesIO((self.path / f"{name}.g{group:03d}.npz").read_bytes())) as z:
      x = z["x"]
      if "offset" in z:  # float16 groups hold x - offset (see Writer.flush)
        x = x.astype(np.float32) + z["offset"]
    return x

  def chunk_labels(self, name: str) -> np.ndarray:
    return np.load(io.BytesIO((self.path / f"{name}.labels.npy").read_bytes()))

  def chunks(self, ranges=None, view=None, order=None):
    names = self.chunk_names(ranges)
    for i in (range(len(names)) if order is None else order):
      yield self.read(names[i], view)

  def load(self, view=None, rows=None) -> tuple[np.ndarray, np.ndarray]:
    """Every range, padding dropped, as float32: for the in-memory path (small sets only).
    `rows`: only these positions of that order (as in `labels()`), e.g. a low-data subset."""
    xs, ys, seen = [], [], 0
    wanted = None if rows is None else np.sort(np.asarray(rows))
    for x, y in self.chunks(view=view):
      keep = np.flatnonzero(y >= 0)
      if wanted is not None:
        at = wanted[(wanted >= seen) & (wanted < seen + len(keep))] - seen
        seen += len(keep)
        keep = keep[at]
      xs.append(x[keep].astype(np.float32))
      ys.append(y[keep])
    return np.concatenate(xs), np.concatenate(ys)

  def labels(self) -> np.ndarray:
    """The real rows' labels, in `load`'s order, without reading the features."""
    out = [y[y >= 0] for y in map(self.chunk_labels, self.chunk_names())]
    return np.concatenate(out)

  def sums(self, view=None, ranges=None) -> tuple[np.ndarray, np.ndarray, int]:
    """Sum and sum of squares [G, D] (float64) and count of the real rows of `ranges` (default
    all), in one streamed pass."""
    total, total_sq, n = 0.0, 0.0, 0
    for x, y in self.chunks(ranges, view=view):
      x = x[y >= 0].astype(np.float64)
      total, total_sq, n = total + x.sum(0), total_sq + (x * x).sum(0), n + len(x)
    return total, total_sq, n

  def moments(self, view=None, sums=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std [G, D] over real rows, from `sums` (default: this store's)."""
    total, total_sq, n = self.sums(view) if sums is None else sums
    mean = total / max(n, 1)
    std = np.sqrt(np.maximum(total_sq / max(n, 1) - mean * mean, 0.0))
    return mean.astype(np.float32), (std + 1e-6).astype(np.float32)


class Writer:
  """Collects this process's rows batch by batch and writes a chunk whenever one is full; after
  each chunk, a progress file records the chunks so far and how many batches they hold, so an
  extraction that is stopped (or killed) resumes after its last whole chunk. A chunk is
  compressed and written in a thread while the device computes the next batches (one write in
  flight: host memory holds at most two chunks); `close` waits for the last."""

  def __init__(self, path, lo: int, chunk_rows: int, dtype, key: dict | None = None):
    self.path, self.lo, self.chunk_rows, self.dtype = epath.Path(path), lo, chunk_rows, dtype
    self.key = key
    self.path.mkdir(parents=True, exist_ok=True)
    done = progress(self.path, lo, key)
    self.names, self.total_rows, self.batches = done["chunks"], done["rows"], done["batches"]
    self.xs, self.ys, self.rows = [], [], 0
    self._thread, self._pending = None, None

  def add(self, x: np.ndarray, y: np.ndarray) -> None:
    """The rows of the next batch (batch number `self.batches`)."""
    self.xs.append(np.asarray(x, np.float32 if self.dtype == np.float16 else self.dtype))
    self.ys.append(np.asarray(y, np.int32))
    self.rows += len(y)
    self.total_rows += len(y)
    self.batches += 1
    if self.rows >= self.chunk_rows:
      self.flush()

  def flush(self) -> None:
    if not self.rows:
      return
    name = f"r{self.lo:06d}-c{len(self.names):05d}"
    x, y = np.concatenate(self.xs), np.concatenate(self.ys)
    groups = [{"x": x[:, g].astype(self.dtype)} for g in range(x.shape[1])]
    if self.dtype == np.float16:
      # Features can sit far from zero with a small spread (a norm's output, averaged over
      # positions): float16 of x itself would round the spread away (steps of 1/32 at 50). So
      # a chunk keeps x minus its float32 mean, and reading adds the mean back.
      real = x[y >= 0] if (y >= 0).any() else x
      offset = real.astype(np.float64).mean(0).astype(np.float32)
      groups = [{"x": (x[:, g] - offset[g]).astype(np.float16), "offset": offset[g]}
                for g in range(x.shape[1])]
    arrays = {"groups": groups, "y": y}
    self.names.append(name)
    self.xs, self.ys, self.rows = [], [], 0
    record = {"key": self.key, "chunks": list(self.names), "rows": self.total_rows,
              "batches": self.batches}
    self.close()  # the previous chunk written first: the progress record names whole chunks
    if self._thread is None:
      from concurrent import futures
      self._thread = futures.ThreadPoolExecutor(1, thread_name_prefix="features-writer")
    self._pending = self._thread.submit(self._write, name, arrays, record)

  def _write(self, name: str, arrays: dict, record: dict) -> None:
    for g, group in enumerate(arrays["groups"]):
      buffer = io.BytesIO()
      np.savez(buffer, **group)
      workdir_lib.write_atomic(self.path / f"{name}.g{g:03d}.npz", buffer.getvalue())
    buffer = io.BytesIO()
    np.save(buffer, arrays["y"])
    workdir_lib.write_atomic(self.path / f"{name}.labels.npy", buffer.getvalue())  # whole now
    workdir_lib.write_atomic(self.path / _progress_name(self.lo), json.dumps(record).encode())

  def close(self) -> None:
    """Waits for the chunk being written (and raises its error, if it failed)."""
    if self._pending is not None:
      pending, self._pending = self._pending, None
      pending.result()


def check_room(directory, needed: int) -> None:
  """One error line when the local disk holding `directory` has less than `needed` bytes
  free (object stores are not checked)."""
  import shutil

  from igpt_jax.config import UserError
  path = epath.Path(directory)
  if "://" in str(path):
    return
  existing = path
  while not existing.exists() and existing.parent != existing:
    existing = existing.parent
  free = shutil.disk_usage(str(existing)).free
  if needed > free:
    raise UserError(f"The probe's features need {needed / 1e9:.3g} GB in {path}, whose disk has "
                    f"{free / 1e9:.3g} GB free: free space, point --workdir elsewhere, probe "
                    "fewer layers (probe.layers), or leave out the random-init baseline "
                    "(probe.baselines=pixels).")


def _progress_name(lo: int) -> str:
  return f"progress-r{lo:06d}.json"


def progress(path, lo: int, key: dict) -> dict:
  """What an earlier extraction for `key` left of row range `lo` in the store at `path`: its
  whole chunks, their rows and batches (none when there is no record for this key)."""
  record = epath.Path(path) / _progress_name(lo)
  if record.exists():
    done = json.loads(record.read_text())
    if done.get("key") == key and all((epath.Path(path) / f"{n}.labels.npy").exists()
                                      for n in done["chunks"]):
      return done
  return {"chunks": [], "rows": 0, "batches": 0}


def _start_over_unless_resumable(path, key: dict) -> None:
  """Process 0, before an extraction into `path`: the old meta.json goes first (an interrupted
  extraction must never read back as complete); everything else too, unless it is an earlier
  extraction of the same `key` to resume."""
  path = epath.Path(path)
  if not path.exists():
    return
  (path / "meta.json").unlink(missing_ok=True)
  records = [json.loads(p.read_text()) for p in path.glob("progress-r*.json")]
  if not any(r.get("key") == key for r in records):
    for p in path.iterdir():
      p.unlink()


def chunk_rows_for(row_bytes: int, chunk_bytes: int, batch_rows: int) -> int:
  """Rows per chunk: a whole number of per-host batches within `chunk_bytes` (at least one)."""
  return max(1, chunk_bytes // max(row_bytes * batch_rows, 1)) * batch_rows


def extract(stores: dict, data, forward, tokenizer, mesh, rules, batch_size: int, key: dict,
            chunk_bytes: int, augment: str, log=None) -> dict:
  """Runs `forward(tokens, pixels) -> {store name: [B, G, D] global array}` over `data` once
  and streams each output to its store (a dict name -> path). Returns the opened Stores.

  Every process takes part (one forward per global batch over the mesh) and writes only the
  rows its devices hold; process 0 writes meta.json once all processes are done. An earlier
  extraction of the same `key` that was stopped (or killed) resumes after its last whole chunk;
  a stop now (SIGTERM, Ctrl-C: the same batch on every process) raises distributed.Preempted,
  dropping the rows held for the next chunk, so a resumed store is chunk for chunk the one an
  uninterrupted extraction writes."""
  from igpt_jax import distributed
  from igpt_jax import sharding as sharding_lib
  from igpt_jax.data import pipeline
  rows = sharding_lib.host_rows(mesh, rules, batch_size)
  lo = int(rows[0])  # names this process's row set (replicas share it, disjoint sets differ)
  writes = distributed.allgather(np.int32(lo)).tolist().index(lo) == jax.process_index()
  if distributed.is_chief():
    for path in stores.values():
      _start_over_unless_resumable(path, key)
  distributed.barrier("features-start")
  num_batches = -(-len(data) // batch_size)
  done = min(progress(path, lo, key)["batches"] for path in stores.values()) if writes \
      else num_batches
  # Every process from the same batch; at least the last one runs, which opens each store's
  # writer (a stop after the last chunk, before meta.json, leaves only meta.json to write).
  start = min(int(distributed.allgather(np.int32(done)).min()), num_batches - 1)
  if start and log:
    log(f"features: resuming after {min(start * batch_size, len(data))}/{len(data)} examples "
        "(the whole chunks of a stopped extraction).")
  writers, dims = {}, {}
  rate = _Rate()
  batches = pipeline.eval_batches(data, batch_size=batch_size, rows=rows, augment=augment,
                                  start_batch=start)
  try:
    for j, batch in enumerate(distributed.PREEMPTION.batches(batches, "probe"), start):
      g = sharding_lib.global_batch({k: batch[k] for k in ("images", "boxes")}, mesh, rules,
                                    batch_size)
      tokens, pixels = tokenizer(g["images"], g["boxes"], with_pixels=True)
      labels = np.where(batch["mask"] > 0, batch["labels"], -1).astype(np.int32)
      parts = {name: _host_part(out, rows, axis=0)
               for name, out in forward(tokens, pixels).items()}
      if not writers:  # every store's chunks hold the same batches: they resume from one batch
        dtypes = {n: np.uint8 if p.dtype == np.uint8 else np.float16 for n, p in parts.items()}
        chunk = min(chunk_rows_for(int(np.prod(p.shape[1:])) * np.dtype(dtypes[n]).itemsize + 4,
                                   chunk_bytes - 4096, len(rows))  # + label, - npz headers
                    for n, p in parts.items())
        for name, part in parts.items():
          dims[name] = part.shape[1:]
          writers[name] = Writer(stores[name], lo, chunk, dtypes[name], key)
      for name, part in parts.items():
        if writes and j >= writers[name].batches:  # a store may hold more than another
          writers[name].add(part, labels)
      if log and (j % 20 == 0 or j == num_batches - 1):
        log(f"features: {min((j + 1) * batch_size, len(data))}/{len(data)} examples"
            + rate.text(j + 1 - start, num_batches - j - 1, batch_size))
  except BaseException:  # a stop: the chunks being written are finished first, so the
    for w in writers.values():  # progress records a resume reads name every whole chunk
      w.close()
    raise
  for w in writers.values():
    if writes:
      w.flush()
      w.close()
  names = {name: {str(lo): {"chunks": w.names, "rows": w.total_rows}}
           for name, w in writers.items()}
  gathered = _gather_names(names)
  for name, path in stores.items():
    meta = {"format": FORMAT, "key": key, "num_examples": len(data),
            "groups": int(dims[name][0]), "dim": int(dims[name][1]),
            "dtype": np.dtype(writers[name].dtype).name, "ranges": gathered[name]}
    workdir_lib.write_bytes(epath.Path(path) / "meta.json", json.dumps(meta, indent=1).encode())
  distributed.barrier("features-written")
  return {name: Store(path) for name, path in stores.items()}


class _Rate:
  """Images per second since the first batch (the compile excluded) and the time left."""

  def __init__(self):
    import time
    self.clock, self.first = time.perf_counter, None

  def text(self, done_batches: int, left_batches: int, batch_size: int) -> str:
    now = self.clock()
    if self.first is None:
      self.first = (now, done_batches)
      return ""
    seconds, batches = now - self.first[0], done_batches - self.first[1]
    if batches <= 0 or seconds <= 0:
      return ""
    per_batch = seconds / batches
    left = left_batches * per_batch
    return (f", {batch_size / per_batch:,.0f} images/s, about "
            + (f"{left / 3600:.1f} h" if left > 5400 else f"{left / 60:.0f} min") + " left")


def _gather_names(names: dict) -> dict:
  """Every process's chunk lists, merged (process 0 writes them into meta.json)."""
  if jax.process_count() == 1:
    return names
  from igpt_jax import distributed
  blob = json.dumps(names).encode()
  sizes = distributed.allgather(np.int64(len(blob)))
  padded = np.frombuffer(blob.ljust(int(sizes.max()), b" "), np.uint8)
  merged = {}
  for row in distributed.allgather(padded):
    for name, ranges in json.loads(bytes(row).decode()).items():
      for lo, written in ranges.items():
        if written["chunks"]:
          merged.setdefault(name, {})[lo] = written
  return merged
