"""The colour palette: k-means centres that turn each pixel into one token.

Centres live in OpenAI's [-1, 1] pixel scale (x / 127.5 - 1) with shape [k, channels]; k=512
for RGB is the paper's "9-bit colour". `quantize` exists in numpy, JAX and TensorFlow and the
three agree exactly: each computes the squared distance channel by channel in the same order,
in float32, and takes the first minimum. (The matmul form |x|^2 - 2x.c + |c|^2 is faster but
rounds differently per backend, so ties can flip between them.)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from igpt_jax import tfimport

PALETTE_FILE = "palette.npz"


@dataclasses.dataclass
class Palette:
  centers: np.ndarray  # [k, channels] float32 in [-1, 1]
  dataset: str = ""
  seed: int = 0

  @property
  def k(self) -> int:
    return self.centers.shape[0]

  @property
  def channels(self) -> int:
    return self.centers.shape[1]

  def to_bytes(self) -> bytes:
    """palette.npz's bytes (written atomically by `workdir.save_palette`)."""
    import io
    buffer = io.BytesIO()
    np.savez(buffer, centers=self.centers.astype(np.float32), k=self.k, channels=self.channels,
             dataset=self.dataset, seed=self.seed)
    return buffer.getvalue()

  @classmethod
  def load(cls, path) -> "Palette":
    """Reads our palette.npz, OpenAI's released centres (.npy, [512, 3] in [-1, 1]) or a Hugging
    Face ImageGPTImageProcessor's preprocessor_config.json (its `clusters`)."""
    import io

    from etils import epath

    from igpt_jax.config import UserError
    path = epath.Path(path)
    if not path.exists():
      raise UserError(f"No palette at {path}: run the fit_palette stage first or set "
                      "--config.palette.path.")
    if path.name.endswith(".json"):
      import json
      clusters = json.loads(path.read_text()).get("clusters")
      if clusters is None:
        raise UserError(f"{path} has no `clusters`: not an ImageGPTImageProcessor config.")
      return cls(_checked(np.asarray(clusters, np.float32), path), dataset="huggingface")
    data = np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
    if isinstance(data, np.ndarray):  # OpenAI's kmeans_centers.npy
      return cls(_checked(data.astype(np.float32), path), dataset="openai")
    return cls(_checked(data["centers"].astype(np.float32), path),
               dataset=str(data["dataset"]) if "dataset" in data else "",
               seed=int(data["seed"]) if "seed" in data else 0)

  def check_channels(self, channels: int) -> None:
    from igpt_jax.config import UserError
    if channels != self.channels:
      raise UserError(f"The palette has {self.channels}-channel colours but the data has "
                       f"{channels} channels: fit a palette on this data (stage fit_palette) "
                       "or set data.channels to match.")


def _checked(centers: np.ndarray, path) -> np.ndarray:
  from igpt_jax.config import UserError
  if centers.ndim != 2 or centers.shape[1] not in (1, 3):
    raise UserError(f"Palette in {path} has shape {centers.shape}; expected [k, 1] or [k, 3].")
  if np.abs(centers).max() > 1.0 + 1e-6:
    raise UserError(f"Palette in {path} is outside [-1, 1]: expected OpenAI's pixel scale.")
  return centers


def to_unit_scale(pixels_uint8):
  """uint8 pixels -> the palette's [-1, 1] scale."""
  return np.asarray(pixels_uint8, np.float32) / np.float32(127.5) - np.float32(1.0)


# -- quantize: numpy, JAX, TensorFlow ---------------------------------------------------------

def _sq_dist(xp, pixels, centers):
  """[..., C] x [k, C] -> [..., k]; channel by channel, left to right, in every backend."""
  total = None
  for c in range(centers.shape[-1]):
    diff = pixels[..., c:c + 1] - centers[:, c]
    total = diff * diff if total is None else total + diff * diff
  return total


def quantize_np(pixels, centers, chunk: int = 1 << 16):
  """Pixels [..., C] in [-1, 1] -> token ids [...] (int32), nearest centre."""
  pixels = np.asarray(pixels, np.float32)
  centers = np.asarray(centers, np.float32)
  flat = pixels.reshape(-1, pixels.shape[-1])
  out = np.empty(flat.shape[0], np.int32)
  for i in range(0, flat.shape[0], chunk):
    out[i:i + chunk] = np.argmin(_sq_dist(np, flat[i:i + chunk], centers), axis=-1)
  return out.reshape(pixels.shape[:-1])


@jax.jit
def quantize_jax(pixels, centers):
  return jnp.argmin(_sq_dist(jnp, pixels.astype(jnp.float32), centers.astype(jnp.float32)),
                    axis=-1).astype(jnp.int32)


def quantize_tf(pixels, centers):
  tf = tfimport.tensorflow()
  pixels = tf.cast(pixels, tf.float32)
  centers = tf.constant(np.asarray(centers, np.float32))
  return tf.argmin(_sq_dist(tf, pixels, centers), axis=-1, output_type=tf.int32)


class Quantizer:
  """Exact nearest-centre lookup that checks only a few candidate centres per pixel.

  The colour cube is cut into cells (32 per channel for RGB, 256 for gray). For each cell we
  keep every centre that can be nearest to some point of it: those whose smallest distance to
  the cell is at most the smallest largest-distance of any centre. A pixel then compares only
  its cell's candidates, in ascending index order with the same per-channel arithmetic as
  `quantize_np`, so the result is identical to the brute force, ties included.
  """

  def __init__(self, centers):
    self.centers = np.asarray(centers, np.float32)
    k, channels = self.centers.shape
    self.bins = 256 if channels == 1 else 32
    width = 256.0 / self.bins
    eps = 0.01  # pixel levels: covers float error when a pixel is binned
    edges = np.arange(self.bins, dtype=np.float64) * width
    lo_axis, hi_axis = (edges - eps) / 127.5 - 1.0, (edges + width + eps) / 127.5 - 1.0
    grid = np.stack(np.meshgrid(*([np.arange(self.bins)] * channels), indexing="ij"), -1)
    grid = grid.reshape(-1, channels)  # cell -> bin per channel, cell id in row-major order
    c = self.centers.astype(np.float64)
    candidates = []
    for start in range(0, len(grid), 2048):
      lo, hi = lo_axis[grid[start:start + 2048]], hi_axis[grid[start:start + 2048]]
      below, above = lo[:, None, :] - c[None], c[None] - hi[:, None, :]
      dmin = np.sum(np.maximum(np.maximum(below, above), 0.0) ** 2, axis=-1)
      dmax = np.sum(np.maximum(below ** 2, above ** 2), axis=-1)
      keep = dmin <= dmax.min(axis=1, keepdims=True) + 1e-12
      candidates += [np.flatnonzero(row) for row in keep]
    width_m = max(len(x) for x in candidates)
    # Pad with each cell's first candidate: a duplicate never wins over its earlier copy.
    self.table = np.stack([np.pad(x, (0, width_m - len(x)), constant_values=x[0])
                           for x in candidates]).astype(np.int32)
    self._table_j, self._centers_j = jnp.asarray(self.table), jnp.asarray(self.centers)

  @property
  def max_candidates(self) -> int:
    return self.table.shape[1]

  def uint8_lut(self) -> np.ndarray:
    """Token of every possible uint8 colour (2^24 for RGB, 32 MB as int16), built once.

    Quantizing uint8 images is then one gather. Building takes seconds on a laptop CPU.
    """
    if getattr(self, "_lut", None) is None:
      channels = self.centers.shape[1]
      levels = to_unit_scale(np.arange(256, dtype=np.uint8))
      if channels == 1:
        colours = levels[:, None]
        self._lut = np.asarray(self(colours)).astype(np.int16)
      else:
        lut = np.empty(1 << 24, np.int16)
        gb = np.stack(np.meshgrid(levels, levels, indexing="ij"), -1).reshape(-1, 2)
        for r in range(0, 256, 16):  # 16 red levels (1M colours) per call
          reds = np.repeat(levels[r:r + 16], len(gb))[:, None]
          colours = np.concatenate([reds, np.tile(gb, (16, 1))], axis=1)
          lut[r << 16:(r + 16) << 16] = np.asarray(self(colours))
        self._lut = lut
    return self._lut

  def quantize_uint8(self, images) -> np.ndarray:
    """uint8 pixels [..., C] -> token ids [...] (int32) through the lookup table."""
    images = np.asarray(images, np.uint8)
    if images.shape[-1] == 1:
      index = images[..., 0]
    else:
      index = ((images[..., 0].astype(np.int32) << 16) | (images[..., 1].astype(np.int32) << 8)
               | images[..., 2])
    return self.uint8_lut()[index].astype(np.int32)

  def __call__(self, pixels):
    return _quantize_with_table(jnp.asarray(pixels, jnp.float32), self._table_j, self._centers_j,
                                self.bins)


@functools.partial(jax.jit, static_argnums=3)
def _quantize_with_table(pixels, table, centers, bins):
  channels = centers.shape[1]
  level = (pixels + 1.0) * 127.5
  b = jnp.clip(jnp.floor(level * (bins / 256.0)).astype(jnp.int32), 0, bins - 1)
  cell = b[..., 0]
  for ch in range(1, channels):
    cell = cell * bins + b[..., ch]
  cand = table[cell]  # [..., M]
  total = None
  for ch in range(channels):
    diff = pixels[..., ch:ch + 1] - centers[:, ch][cand]
    total = diff * diff if total is None else total + diff * diff
  best = jnp.argmin(total, axis=-1)
  return jnp.take_along_axis(cand, best[..., None], axis=-1)[..., 0]


def dequantize(tokens, centers):
  """Token ids [...] -> uint8 pixels [..., C], decoded as rint(127.5 * (c + 1))."""
  pixels = np.rint(np.float32(127.5) * (np.asarray(centers, np.float32) + 1.0))
  return np.clip(pixels, 0, 255).astype(np.uint8)[np.asarray(tokens)]


# -- fitting ----------------------------------------------------------------------------------

def _kmeans_pp_init(key, x, k):
  """k-means++: each next centre drawn with probability proportional to D(x)^2."""
  n = x.shape[0]
  first = jax.random.randint(key, (), 0, n)
  centers = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])
  d2 = jnp.sum((x - x[first]) ** 2, axis=-1)

  def body(i, carry):
    centers, d2, key = carry
    key, sub = jax.random.split(key)
    # A sample with all points on existing centres (fewer distinct colours than k) falls back to
    # uniform choice; the duplicate centre then stays empty and is harmless.
    p = jnp.where(d2.sum() > 0, d2 / jnp.maximum(d2.sum(), 1e-30), jnp.full_like(d2, 1.0 / n))
    idx = jax.random.choice(sub, n, p=p)
    centers = centers.at[i].set(x[idx])
    return centers, jnp.minimum(d2, jnp.sum((x - x[idx]) ** 2, axis=-1)), key

  centers, _, _ = jax.lax.fori_loop(1, k, body, (centers, d2, key))
  return centers


@jax.jit
def _lloyd_step(x, centers):
  assign = jnp.argmin(_sq_dist(jnp, x, centers), axis=-1)
  sums = jax.ops.segment_sum(x, assign, num_segments=centers.shape[0])
  counts = jax.ops.segment_sum(jnp.ones(x.shape[0]), assign, num_segments=centers.shape[0])
  new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centers)
  inertia = jnp.mean(jnp.min(_sq_dist(jnp, x, centers), axis=-1))
  return new, inertia


def fit(pixels, k: int, seed: int = 0, iters: int = 30, log=None,
        on_iteration=None) -> np.ndarray:
  """k-means on pixels [M, C] in [-1, 1]: k-means++ init, then Lloyd. Deterministic for a seed.
  `on_iteration(i)` runs before each Lloyd iteration (it may raise to stop the fit)."""
  x = jnp.asarray(pixels, jnp.float32)
  if x.ndim != 2 or x.shape[0] < k:
    raise ValueError(f"Need at least k={k} pixels of shape [M, C] to fit a palette, got {x.shape}.")
  centers = jax.jit(_kmeans_pp_init, static_argnums=2)(jax.random.key(seed), x, k)
  for i in range(iters):
    if on_iteration is not None:
      on_iteration(i)
    centers, inertia = _lloyd_step(x, centers)
    if log is not None and (i % 10 == 0 or i == iters - 1):
      log(f"k-means iteration {i + 1}/{iters}: mean squared distance {float(inertia):.5f}")
  return np.asarray(centers, np.float32)


def sample_pixels(images_uint8: np.ndarray, num: int, seed: int = 0) -> np.ndarray:
  """`num` pixels [num, C] in [-1, 1] drawn uniformly (with replacement) from images [N, H, W, C].

  With replacement, so sampling a billion-pixel data set needs no permutation of it.
  """
  flat = images_uint8.reshape(-1, images_uint8.shape[-1])
  return to_unit_scale(flat[np.random.default_rng(seed).integers(0, flat.shape[0], num)])


def uniform_grid(k: int, channels: int) -> np.ndarray:
  """A baseline palette: an evenly spaced grid with k points (k must be a perfect power)."""
  per_axis = round(k ** (1.0 / channels))
  if per_axis ** channels != k:
    raise ValueError(f"k={k} is not a perfect {channels}-th power.")
  axis = np.linspace(-1.0, 1.0, per_axis, dtype=np.float32)
  grid = np.stack(np.meshgrid(*([axis] * channels), indexing="ij"), axis=-1)
  return grid.reshape(-1, channels)
