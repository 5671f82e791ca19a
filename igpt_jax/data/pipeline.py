"""ImageSet -> batches of uint8 rows, crop boxes and labels: tf.data, or its TF-free twin.

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

The host work per step (`step_batch`: positions -> indices -> reads -> crop boxes) runs in a
tf.data pipeline (steps read in parallel, in order, prefetched) where TensorFlow is installed,
and otherwise one step ahead in a thread; both call the same function, so the bytes are the
same. Crop, resize and quantization run in JAX (`transform.Tokenizer`), on the accelerator in
training: the host never does per-pixel work, and the tokens do not depend on which pipeline
fed them."""

from __future__ import annotations

import functools
import itertools
import queue
import threading

import numpy as np

from igpt_jax import tfimport
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


PIPELINES = ("auto", "tf.data", "python")


def resolve_pipeline(pipeline: str) -> str:
  """'auto': tf.data where TensorFlow is installed, else the Python twin (GPU images often
  lack TensorFlow). Both give bit-identical batches."""
  if pipeline not in PIPELINES:
    raise ValueError(f"pipeline must be one of {PIPELINES}, got {pipeline!r}")
  if pipeline != "auto":
    return pipeline
  try:
    tfimport.tensorflow()
  except ImportError:
    return "python"
  return "tf.data"


def step_batch(data: ImageSet, step: int, *, batch_size: int, rows: np.ndarray, seed: int,
               augment: str, crop_min: float) -> dict:
  """The host work of one step, a pure function of (seed, step): this host's rows of the
  global batch -> example indices -> their uint8 rows (read), labels and crop boxes."""
  positions = step_positions(step, batch_size, rows)
  idx = example_indices(positions, len(data), seed)
  return {"images": np.asarray(data.images[idx]), "labels": data.labels[idx],
          "boxes": transform.train_boxes(positions, seed, augment, crop_min,
                                         side=data.images.shape[1]), "step": step}


def train_batches(data: ImageSet, *, batch_size: int, seed: int, start_step: int = 0,
                  num_steps: int | None = None, rows=None, augment: str = "auto",
                  crop_min: float = 0.75, prefetch: int = 2, pipeline: str = "auto",
                  stage: str = "pretrain", log=print):
  """Iterator of {'images': uint8 [b, H, W, C], 'boxes': float32 [b, 4], 'labels': int32 [b],
  'step': int} from start_step; b = len(rows) rows of each global batch (see `step_positions`).

  pipeline 'tf.data': steps -> `step_batch` in parallel (num_parallel_calls=AUTOTUNE,
  deterministic order) -> prefetch; 'python': the same `step_batch` one step ahead in a thread.
  The batches are the same bytes either way (a test asserts equality)."""
  rows = batch_rows(rows, batch_size)
  read = functools.partial(step_batch, data, batch_size=batch_size, rows=rows, seed=seed,
                           augment=transform.resolve_augment(augment, data.full_size, stage),
                           crop_min=crop_min)
  end = None if num_steps is None else start_step + num_steps
  if resolve_pipeline(pipeline) == "tf.data":
    batches = _tf_data_batches(read, start_step, end, prefetch)
  else:
    steps = itertools.count(start_step) if end is None else range(start_step, end)
    batches = prefetched(map(read, steps), prefetch)
  return _note_epochs(batches, len(data), batch_size, data.skipped_files, log)


def _tf_data_batches(read, start: int, end: int | None, prefetch: int):
  tf = tfimport.tensorflow()

  def host_work(step):
    b = read(int(step))
    return b["images"], b["labels"], b["boxes"]

  def mapped(step):
    images, labels, boxes = tf.numpy_function(host_work, [step],
                                              (tf.uint8, tf.int32, tf.float32), stateful=False)
    return step, images, labels, boxes

  ds = tf.data.Dataset.range(start, np.iinfo(np.int64).max if end is None else end)
  ds = ds.map(mapped, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.prefetch(prefetch if prefetch > 0 else tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True
  for step, images, labels, boxes in ds.with_options(options).as_numpy_iterator():
    yield {"images": images, "labels": labels, "boxes": boxes, "step": int(step)}


def _note_epochs(batches, n: int, batch_size: int, skipped_files, log):
  last_epoch = None
  for batch in batches:
    epoch = batch["step"] * batch_size // n
    if last_epoch is not None and epoch != last_epoch and skipped_files:
      log(f"epoch {last_epoch} done; {len(skipped_files)} unreadable file(s) were skipped.")
    last_epoch = epoch
    yield batch


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


def eval_batches(data: ImageSet, *, batch_size: int, rows=None, augment: str = "auto",
                 start_batch: int = 0, prefetch: int = 2):
  """One pass in order: global batch j covers examples [j * batch_size, (j + 1) * batch_size),
  the last one padded, and this process yields its `rows` of each, from batch `start_batch`.
  Every process yields the same number of batches (ceil(N / batch_size) - start_batch), so
  collective steps stay in lockstep. Reads run `prefetch` batches ahead in a thread, as
  training's do: reading and the device's work overlap.

  Yields {'images', 'boxes', 'labels', 'mask'}; mask is 1.0 for real examples, 0.0 for padding.
  """
  return prefetched(_eval_batches(data, batch_size, rows, augment, start_batch), prefetch)


def _eval_batches(data: ImageSet, batch_size: int, rows, augment: str, start_batch: int):
  n = len(data)
  rows = batch_rows(rows, batch_size)
  boxes = transform.eval_boxes(len(rows), transform.resolve_augment(augment, data.full_size))
  for start in range(start_batch * batch_size, n, batch_size):
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
