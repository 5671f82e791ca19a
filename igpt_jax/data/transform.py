"""uint8 images + crop boxes -> palette tokens, in JAX: the one implementation of the input
transform, run where the batch is (the accelerator in training, the host CPU elsewhere).

Why here and not in tf.data: the host then only gathers uint8 rows (a memcpy) and draws crop
boxes, so training needs no TensorFlow (GPU images often lack it) and the batches are the same
with or without it. The work is small: two matmuls per image for crop + resize (~1 MFLOP at
32x32 from a 64-pixel side) and one table lookup per pixel, against ~0.5 TFLOP per image of
training for iGPT-S.

Crop + resize is exact area resampling: output pixel j averages the crop's source pixels
weighted by how much of each its footprint covers (a box filter, as `tf.image.resize(...,
"area")` and PIL's BOX for whole-number factors). An image already at the model's resolution
with the whole-image box passes through unchanged, and a 2x shrink is the plain 2x2 mean; a
bilinear resize would blur both. A box that leaves the image reads its reflection (numpy's
and TensorFlow's 'REFLECT' padding, the edge pixel not repeated), and a box with x2 < x1 is the
horizontal mirror of the box from x2 to x1. Levels are then rounded (half to even) to uint8,
and the palette lookup is exact (`palette.Quantizer.uint8_lut`).

The views are the paper's (Chen et al. 2020, appendix on experimental details): "we randomly
resize an image such that the shorter sidelength is in the range [256, 384] and then take a
random 224 x 224 crop. When evaluating on ImageNet, we resize the image such that the shorter
sidelength is 224 and use the single 224 x 224 center crop. When full-network fine-tuning on
CIFAR-10 and CIFAR-100, we use the augmentation popularized by Wide Residual Networks: 4 pixels
are reflection padded on each side, and a 32 x 32 crop is randomly sampled from the padded
image or its horizontal flip." ('paper' for full-size images, 'wrn' for images stored at about
the input size; `resolve_augment`.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from igpt_jax import palette as palette_lib

AUGMENTS = ("auto", "paper", "wrn", "crop", "none")
WRN_PAD = 4 / 32  # the paper's 4 pixels of reflection on each side of a 32-pixel CIFAR image


# -- crop boxes (host, numpy): the only randomness of the input pipeline ----------------------

def resolve_augment(augment: str, full_size: bool, stage: str = "pretrain") -> str:
  """'auto' is the paper's view for the data and the stage: its random crops for sources
  stored from full-size images (ImageNet-like); for sources already at about the input size
  (CIFAR-like), its Wide-ResNet shifts and flips when fine-tuning, and nothing otherwise (the
  paper names no augmentation there, and a crop resized back up only blurs)."""
  if augment not in AUGMENTS:
    raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
  if augment == "auto":
    return "paper" if full_size else "wrn" if stage == "finetune" else "none"
  return augment


def position_uniforms(seed: int, positions: np.ndarray, stream: int) -> np.ndarray:
  """float64 U[0, 1) per global position, a pure function of (seed, position, stream):
  SplitMix64 of a counter, vectorised (a generator per example cost ~20 us, the whole host
  budget of a 50k images/s input path)."""
  with np.errstate(over="ignore"):
    x = (np.asarray(positions, np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
         + np.uint64((seed * 0x632BE59BD9B4E019 + (stream + 1) * 0xD1B54A32D192ED03)
                     % 2 ** 64))
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
  return (x >> np.uint64(11)).astype(np.float64) / float(2 ** 53)


def train_boxes(positions: np.ndarray, seed: int, augment: str, crop_min: float = 0.75,
                side: int = 32):
  """Crop boxes [b, 4] (y1, x1, y2, x2 as fractions of the stored square of `side` pixels) of
  the examples at global `positions`; a box depends on (seed, position) only, so any host
  reading any rows draws the same boxes.

  'paper': short side drawn from [256, 384], a random 224 crop (the paper's ImageNet view, as
           in ResNet training), on the stored centre square: a square of side 224 / U(256, 384).
  'wrn':   the paper's CIFAR fine-tuning view: the image shifted by a whole number of pixels in
           [-4, 4] per axis (4 of 32: WRN_PAD of the side; reflection beyond the edge) and
           mirrored half the time (x2 < x1).
  'crop':  a random square covering crop_min..1 of the side.
  'none':  the evaluation box.
  """
  if augment == "none":
    return eval_boxes(len(positions), "none")
  if augment == "wrn":
    pad = int(round(WRN_PAD * side))
    u = [position_uniforms(seed, positions, k) for k in range(3)]
    y, x = ((np.floor(v * (2 * pad + 1)) - pad) / side for v in u[:2])
    boxes = np.stack([y, x, y + 1.0, x + 1.0], axis=-1)
    flip = u[2] < 0.5
    boxes[flip] = boxes[flip][:, [0, 3, 2, 1]]
    return boxes.astype(np.float32)
  u = [position_uniforms(seed, positions, k) for k in range(3)]
  side = 224.0 / (256.0 + 128.0 * u[0]) if augment == "paper" else crop_min + (1 - crop_min) * u[0]
  y, x = u[1] * (1.0 - side), u[2] * (1.0 - side)
  return np.stack([y, x, y + side, x + side], axis=-1).astype(np.float32)


def eval_boxes(n: int, augment: str) -> np.ndarray:
  """The evaluation view: the whole stored centre square, for every augmentation (the paper
  evaluates ImageNet on "the single 224 x 224 center crop" of the image with its shorter side
  at 224: the centre square itself, which is what a full-size source stores)."""
  del augment  # one view for all; kept so callers say which training view they evaluate
  return np.tile(np.array([[0.0, 0.0, 1.0, 1.0]], np.float32), (n, 1))


def input_view(data, augment: str, resolution: int) -> dict:
  """How an image of `data` reaches the model at evaluation, for an export's image processor
  (hf_processor.py): the side files were decoded to as a centre square (None: arrays stored as
  given), the evaluation crop box on it, the resolution and the channels."""
  mode = resolve_augment(augment, data.full_size)
  return {"short_side": int(data.decoded_side) or None,
          "crop_box": [float(v) for v in eval_boxes(1, mode)[0]], "resolution": int(resolution),
          "channels": int(data.images.shape[-1])}


# -- crop, resize, quantize (JAX) -------------------------------------------------------------

def _reflect_fold(size: int) -> np.ndarray:
  """[3 size, size] one-hot: pixel k of the image extended by its reflection on both sides
  (k in [-size, 2 size)) -> the image pixel it shows (-1 -> 1, size -> size - 2)."""
  k = np.arange(-size, 2 * size)
  period = max(2 * size - 2, 1)
  k = np.abs(k) % period
  k = np.where(k >= size, period - k, k)
  return np.eye(size, dtype=np.float32)[k]


def _area_matrix(lo, hi, size: int, out: int):
  """[b, out, size]: the weight of source pixel k in output pixel j, for a crop [lo, hi] (as
  fractions of the `size`-pixel side): the share of j's footprint, [lo + j s, lo + (j + 1) s) x
  size with s = (hi - lo) / out, that pixel [k, k + 1) covers; outside the image, the pixel its
  reflection shows. hi < lo: the crop [hi, lo] mirrored."""
  flip = hi < lo
  lo, hi = jnp.minimum(lo, hi), jnp.maximum(lo, hi)
  width = (hi - lo) * size / out  # [b] source pixels per output pixel
  start = lo[:, None] * size + jnp.arange(out, dtype=jnp.float32)[None, :] * width[:, None]
  end = start + width[:, None]
  k = jnp.arange(-size, 2 * size, dtype=jnp.float32)
  overlap = jnp.clip(jnp.minimum(end[..., None], k + 1.0) - jnp.maximum(start[..., None], k),
                     0.0, None)  # [b, out, 3 size]
  weights = overlap / jnp.maximum(jnp.sum(overlap, -1, keepdims=True), 1e-12)
  weights = jnp.einsum("bok,ks->bos", weights, _reflect_fold(size),
                       precision=jax.lax.Precision.HIGHEST)
  return jnp.where(flip[:, None, None], weights[:, ::-1, :], weights)


def resize_levels(images, boxes, resolution: int):
  """uint8 [b, H, W, C] + boxes [b, 4] -> float32 pixel levels [b, r, r, C], rounded to
  integers in [0, 255]."""
  b, h, w, c = images.shape
  rows = _area_matrix(boxes[:, 0], boxes[:, 2], h, resolution)
  cols = _area_matrix(boxes[:, 1], boxes[:, 3], w, resolution)
  x = images.astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST  # no TF32 on GPUs: the same levels on every backend
  x = jnp.einsum("brh,bhwc->brwc", rows, x, precision=hi)
  x = jnp.einsum("brwc,bsw->brsc", x, cols, precision=hi)
  return jnp.clip(jnp.round(x), 0.0, 255.0)


def tokens_from_levels(levels, lut):
  """Levels [b, r, r, C] -> tokens [b, r * r] (int32) through the uint8 colour table."""
  v = levels.astype(jnp.int32)
  index = v[..., 0] if v.shape[-1] == 1 else (v[..., 0] << 16) | (v[..., 1] << 8) | v[..., 2]
  return lut[index].astype(jnp.int32).reshape(v.shape[0], -1)


def tokenize(images, boxes, lut, *, resolution: int, with_pixels: bool = False):
  """uint8 [b, H, W, C] -> tokens [b, r * r] (and uint8 pixels [b, r, r, C] if asked)."""
  levels = resize_levels(images, boxes, resolution)
  tokens = tokens_from_levels(levels, lut)
  return (tokens, levels.astype(jnp.uint8)) if with_pixels else tokens


@functools.partial(jax.jit, static_argnames="resolution")
def _levels_uint8(images, boxes, resolution: int):
  return resize_levels(images, boxes, resolution).astype(jnp.uint8)


def pixels_at_resolution(images, boxes, resolution: int, chunk: int = 512) -> np.ndarray:
  """uint8 [n, H, W, C] -> uint8 [n, r, r, C] as the model sees them (for palette fitting)."""
  return np.concatenate([np.asarray(_levels_uint8(images[i:i + chunk], boxes[i:i + chunk],
                                                  resolution))
                         for i in range(0, len(images), chunk)])


class Tokenizer:
  """The palette's lookup table placed once (replicated over a mesh, or on the default device),
  and the jitted transform around it."""

  def __init__(self, centers, resolution: int, mesh=None, rules=None):
    """With a mesh, batches come in as global arrays sharded over the batch axes and tokens
    leave with the batch sharding the train step expects."""
    self.centers = np.asarray(centers, np.float32)
    self.resolution = resolution
    lut = lut_for(self.centers.tobytes(), self.centers.shape)
    if mesh is None:
      self.lut = jnp.asarray(lut)
      out = None
    else:
      from igpt_jax import sharding as sharding_lib
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      self.lut = sharding_lib.place(lut, replicated)
      out = sharding_lib.batch_sharding(mesh, rules or sharding_lib.DEFAULT_RULES, 2)
    self._fn = {wp: jax.jit(functools.partial(tokenize, resolution=resolution, with_pixels=wp),
                            out_shardings=None if out is None or wp else out)
                for wp in (False, True)}

  @property
  def channels(self) -> int:
    return self.centers.shape[1]

  def __call__(self, images, boxes, with_pixels: bool = False):
    return self._fn[with_pixels](images, boxes, self.lut)

  def numpy(self, images, boxes, with_pixels: bool = False, chunk: int = 512):
    """Host arrays in, host arrays out (probe, sample, palette fitting), in chunks of `chunk`."""
    outs = [self(images[i:i + chunk], boxes[i:i + chunk], with_pixels)
            for i in range(0, len(images), chunk)]
    if with_pixels:
      return (np.concatenate([np.asarray(t) for t, _ in outs]),
              np.concatenate([np.asarray(p) for _, p in outs]))
    return np.concatenate([np.asarray(t) for t in outs])


@functools.lru_cache(maxsize=2)
def lut_for(centers_bytes: bytes, shape: tuple[int, int]) -> np.ndarray:
  """The exact token of every uint8 colour (int16; 32 MB for RGB), cached per palette."""
  centers = np.frombuffer(centers_bytes, np.float32).reshape(shape)
  return palette_lib.Quantizer(centers).uint8_lut()
