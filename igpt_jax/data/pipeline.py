"""ImageSet -> palette-token batches with tf.data; the only module that imports TensorFlow.

Determinism: the examples of step s are a pure function of (seed, s). Global example position
p = s * batch + i maps to index perm(seed, epoch = p // N)[p % N], and its random crop is drawn
from a generator seeded by (seed, p). So a run restarted at step s sees exactly the batches an
uninterrupted run would have, without reading the data before s.

Multi-host: each process reads rows [lo, hi) of every global batch, the rows its devices hold
(`sharding.host_rows`: disjoint for data parallelism, equal for processes that hold replicas);
`sharding.global_batch` reassembles them into global arrays.

Pretraining augmentation (as in the paper): a random square crop covering `crop_min`..1 of the
side, resized to the input resolution. Evaluation: the whole (square) image, resized.
"""

from __future__ import annotations

import functools

import numpy as np

from igpt_jax import palette as palette_lib
from igpt_jax.data.sources import ImageSet


_TF_CONFIGURED = False


def _tf():
  """TensorFlow for the input pipeline only: no GPU, and few threads, so it does not fight
  XLA for the host's cores (the per-batch work here is small)."""
  global _TF_CONFIGURED
  import tensorflow as tf
  if not _TF_CONFIGURED:
    tf.config.set_visible_devices([], "GPU")  # the accelerator belongs to JAX
    try:
      tf.config.threading.set_inter_op_parallelism_threads(1)
      tf.config.threading.set_intra_op_parallelism_threads(1)
    except RuntimeError:  # TF already initialised by the caller: keep its settings
      pass
    _TF_CONFIGURED = True
  return tf


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


def step_positions(step: int, batch_size: int, rows: tuple[int, int] | None = None) -> np.ndarray:
  """Global example positions of rows [lo, hi) (default: all) of the batch of `step`."""
  lo, hi = rows or (0, batch_size)
  if not 0 <= lo < hi <= batch_size:
    raise ValueError(f"Rows {rows} are not inside a batch of {batch_size}.")
  return step * batch_size + np.arange(lo, hi)


def example_indices(positions: np.ndarray, num_examples: int, seed: int) -> np.ndarray:
  epochs = positions // num_examples
  out = np.empty_like(positions)
  for epoch in np.unique(epochs):
    sel = epochs == epoch
    out[sel] = epoch_permutation(seed, int(epoch), num_examples)[positions[sel] % num_examples]
  return out


def crop_boxes(positions: np.ndarray, seed: int, crop_min: float) -> np.ndarray:
  """Random square crops [b, 4] (y1, x1, y2, x2 normalised), one generator per example position."""
  boxes = np.empty((len(positions), 4), np.float32)
  for i, p in enumerate(positions):
    rng = np.random.default_rng([seed, 1, int(p)])
    side = rng.uniform(crop_min, 1.0)
    y, x = rng.uniform(0.0, 1.0 - side, size=2)
    boxes[i] = (y, x, y + side, x + side)
  return boxes


def _preprocess(images, boxes, centers, resolution: int, with_pixels: bool = False):
  """uint8 [b, H, W, C] + boxes -> tokens [b, resolution**2] (and the resized uint8 pixels)."""
  tf = _tf()
  b = tf.shape(images)[0]
  big = tf.image.crop_and_resize(tf.cast(images, tf.float32), boxes, tf.range(b),
                                 (2 * resolution, 2 * resolution), method="bilinear")
  # A 2x2 average halves to the input resolution: an antialiased downsample.
  small = tf.nn.avg_pool2d(big, 2, 2, "VALID")
  levels = tf.clip_by_value(tf.round(small), 0.0, 255.0)
  tokens = palette_lib.quantize_tf(levels / 127.5 - 1.0, centers)
  tokens = tf.reshape(tokens, (b, resolution * resolution))
  return (tokens, tf.cast(levels, tf.uint8)) if with_pixels else tokens


def train_batches(data: ImageSet, centers: np.ndarray, *, resolution: int, batch_size: int,
                  seed: int, start_step: int = 0, num_steps: int | None = None,
                  rows: tuple[int, int] | None = None, augment: bool = True,
                  crop_min: float = 0.75, prefetch: int = 2, log=print):
  """Iterator of {'tokens': int32 [b, N], 'labels': int32 [b], 'step': int64} from start_step;
  b = hi - lo rows of each global batch (see `step_positions`)."""
  tf = _tf()
  palette_lib.Palette(np.asarray(centers)).check_channels(data.images.shape[-1])
  n = len(data)
  lo, hi = rows or (0, batch_size)
  local = hi - lo
  full = np.tile(np.array([[0.0, 0.0, 1.0, 1.0]], np.float32), (local, 1))

  def generate():
    step, last_epoch = start_step, None
    while num_steps is None or step < start_step + num_steps:
      positions = step_positions(step, batch_size, (lo, hi))
      epoch = int(positions[0] // n)
      if last_epoch is not None and epoch != last_epoch and data.skipped_files:
        log(f"epoch {last_epoch} done; {len(data.skipped_files)} unreadable file(s) were skipped.")
      last_epoch = epoch
      idx = example_indices(positions, n, seed)
      boxes = crop_boxes(positions, seed, crop_min) if augment else full
      yield data.images[idx], data.labels[idx], boxes, np.int64(step)
      step += 1

  h, w, c = data.images.shape[1:]
  ds = tf.data.Dataset.from_generator(generate, output_signature=(
      tf.TensorSpec((local, h, w, c), tf.uint8), tf.TensorSpec((local,), tf.int32),
      tf.TensorSpec((local, 4), tf.float32), tf.TensorSpec((), tf.int64)))
  ds = ds.map(lambda im, lab, box, step: {"tokens": _preprocess(im, box, centers, resolution),
                                          "labels": lab, "step": step},
              num_parallel_calls=2, deterministic=True)
  options = tf.data.Options()
  options.threading.private_threadpool_size = 2
  return ds.with_options(options).prefetch(prefetch).as_numpy_iterator()


def eval_batches(data: ImageSet, centers: np.ndarray, *, resolution: int, batch_size: int,
                 rows: tuple[int, int] | None = None, with_pixels: bool = False):
  """One pass in order: global batch j covers examples [j * batch_size, (j + 1) * batch_size),
  the last one padded, and this process yields its rows [lo, hi) of each. Every process yields
  the same number of batches (ceil(N / batch_size)), so collective steps stay in lockstep.

  Yields {'tokens', 'labels', 'mask'} (and 'pixels', uint8 [b, r, r, C], if asked); mask is
  1.0 for real examples, 0.0 for padding.
  """
  tf = _tf()
  palette_lib.Palette(np.asarray(centers)).check_channels(data.images.shape[-1])
  n = len(data)
  lo, hi = rows or (0, batch_size)
  boxes = np.tile(np.array([[0.0, 0.0, 1.0, 1.0]], np.float32), (hi - lo, 1))
  for start in range(0, n, batch_size):
    positions = start + np.arange(lo, hi)
    real = positions < n
    idx = np.where(real, positions, n - 1)
    out = _preprocess(tf.constant(data.images[idx]), boxes, centers, resolution, with_pixels)
    batch = {"labels": data.labels[idx], "mask": real.astype(np.float32)}
    if with_pixels:
      batch["tokens"], batch["pixels"] = out[0].numpy(), out[1].numpy()
    else:
      batch["tokens"] = out.numpy()
    yield batch


def tokens_of(data: ImageSet, centers: np.ndarray, resolution: int, batch_size: int = 512,
              with_pixels: bool = False):
  """All of a (small) ImageSet as evaluation tokens [N, resolution**2], in order (and pixels)."""
  batches = list(eval_batches(data, centers, resolution=resolution, batch_size=batch_size,
                              with_pixels=with_pixels))
  tokens = np.concatenate([b["tokens"][b["mask"] > 0] for b in batches])
  if not with_pixels:
    return tokens
  return tokens, np.concatenate([b["pixels"][b["mask"] > 0] for b in batches])
