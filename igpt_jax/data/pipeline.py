"""ImageSet -> batches of uint8 rows, crop boxes and labels; no TensorFlow.

Determinism: the examples of step s are a pure function of (seed, s). Global example position
p = s * batch + i maps to index perm(seed, epoch = p // N)[p % N], and its crop box is drawn
from a generator seeded by (seed, p). So a run restarted at step s sees exactly the batches an
uninterrupted run would have, without reading the data before s.

Multi-host: each process reads its rows of every global batch, the rows its devices hold
(`sharding.host_rows`: an index set, not necessarily contiguous on a TPU slice; disjoint for
data parallelism, equal for processes that hold replicas);
`sharding.global_batch` reassembles them into global arrays. A process reads only the images
of its rows (`data.images[indices]`: `pread` or ranged reads for prepared sets), so host
memory does not grow with the data set.

The host work per batch is a gather and the crop boxes, done one batch ahead in a thread;
crop, resize and quantization run in JAX (`transform.Tokenizer`), on the accelerator in
training.
"""

from __future__ import annotations

import functools
import queue
import threading

import numpy as np

from igpt_jax.data import transform
from igpt_jax.data.sources import ImageSet


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


def batch_rows(rows, batch_size: int) -> np.ndarray:
  """`rows` (indices into a global batch; None = all of it) as a checked int array."""
  rows = np.arange(batch_size) if rows is None else np.asarray(rows, np.int64)
  if rows.ndim != 1 or not len(rows) or rows.min() < 0 or rows.max() >= batch_size:
    raise ValueError(f"Rows {rows} are not inside a batch of {batch_size}.")
  return rows


def step_positions(step: int, batch_size: int, rows=None) -> np.ndarray:
  """Global example positions of `rows` (default: all) of the batch of `step`."""
  return step * batch_size + batch_rows(rows, batch_size)


def example_indices(positions: np.ndarray, num_examples: int, seed: int) -> np.ndarray:
  epochs = positions // num_examples
  out = np.empty_like(positions)
  for epoch in np.unique(epochs):
    sel = epochs == epoch
    out[sel] = epoch_permutation(seed, int(epoch), num_examples)[positions[sel] % num_examples]
  return out


def train_batches(data: ImageSet, *, batch_size: int, seed: int, start_step: int = 0,
                  num_steps: int | None = None, rows=None,
                  augment: str = "auto", crop_min: float = 0.75, prefetch: int = 2, log=print):
  """Iterator of {'images': uint8 [b, H, W, C], 'boxes': float32 [b, 4], 'labels': int32 [b],
  'step': int} from start_step; b = len(rows) rows of each global batch (see `step_positions`)."""
  n = len(data)
  rows = batch_rows(rows, batch_size)
  augment = transform.resolve_augment(augment, data.full_size)

  def generate():
    step, last_epoch = start_step, None
    while num_steps is None or step < start_step + num_steps:
      positions = step_positions(step, batch_size, rows)
      epoch = int(positions[0] // n)
      if last_epoch is not None and epoch != last_epoch and data.skipped_files:
        log(f"epoch {last_epoch} done; {len(data.skipped_files)} unreadable file(s) were skipped.")
      last_epoch = epoch
      idx = example_indices(positions, n, seed)
      yield {"images": np.asarray(data.images[idx]), "labels": data.labels[idx],
             "boxes": transform.train_boxes(positions, seed, augment, crop_min), "step": step}
      step += 1

  return prefetched(generate(), prefetch)


def prefetched(iterator, depth: int):
  """Runs `iterator` `depth` items ahead in a thread (reads overlap the step); errors are
  raised in the consumer, in order."""
  if depth <= 0:
    yield from iterator
    return
  items: queue.Queue = queue.Queue(maxsize=depth)
  done = object()
  stop = threading.Event()

  def work():
    try:
      for item in iterator:
        while not stop.is_set():
          try:
            items.put((item, None), timeout=0.1)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
      items.put((done, None))
    except BaseException as e:  # noqa: BLE001 - handed to the consumer
      items.put((None, e))

  thread = threading.Thread(target=work, daemon=True, name="input-prefetch")
  thread.start()
  try:
    while True:
      item, error = items.get()
      if error is not None:
        raise error
      if item is done:
        return
      yield item
  finally:
    stop.set()


def eval_batches(data: ImageSet, *, batch_size: int, rows=None, augment: str = "auto"):
  """One pass in order: global batch j covers examples [j * batch_size, (j + 1) * batch_size),
  the last one padded, and this process yields its `rows` of each. Every process yields
  the same number of batches (ceil(N / batch_size)), so collective steps stay in lockstep.

  Yields {'images', 'boxes', 'labels', 'mask'}; mask is 1.0 for real examples, 0.0 for padding.
  """
  n = len(data)
  rows = batch_rows(rows, batch_size)
  boxes = transform.eval_boxes(len(rows), transform.resolve_augment(augment, data.full_size))
  for start in range(0, n, batch_size):
    positions = start + rows
    real = positions < n
    idx = np.where(real, positions, n - 1)
    yield {"images": np.asarray(data.images[idx]), "boxes": boxes, "labels": data.labels[idx],
           "mask": real.astype(np.float32)}


def tokens_of(data: ImageSet, centers: np.ndarray, resolution: int, batch_size: int = 512,
              with_pixels: bool = False, augment: str = "auto"):
  """All of a (small) ImageSet as evaluation tokens [N, resolution**2], in order (and pixels)."""
  from igpt_jax import palette as palette_lib
  palette_lib.Palette(np.asarray(centers)).check_channels(data.images.shape[-1])
  tokenizer = transform.Tokenizer(centers, resolution)
  parts = []
  for batch in eval_batches(data, batch_size=batch_size, augment=augment):
    out = tokenizer.numpy(batch["images"], batch["boxes"], with_pixels, batch_size)
    keep = batch["mask"] > 0  # the padded last batch keeps one compiled shape
    parts.append(tuple(o[keep] for o in (out if with_pixels else (out,))))
  outs = tuple(np.concatenate(column) for column in zip(*parts))
  return outs if with_pixels else outs[0]
