"""The image processor an igpt_jax export ships: raw images to the tokens its model was trained on.

transformers' ImageGPTImageProcessor squashes the whole image to the model's resolution with a
PIL filter. An igpt_jax model saw something else: photos stored as their centre square with the
short side resized (bicubic) to twice the resolution, then the evaluation view (a centre crop of
that square, where the config's augmentation has one) averaged down by exact area resampling,
levels rounded half to even, and each pixel's nearest palette colour. A photo therefore
tokenizes differently through the stock processor. This class does what igpt_jax does, with the
view its export recorded; `export` copies this file into the model folder, where
`AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)` loads it. The stock class
still loads the same folder (the whole image, BOX resampling).

Self-contained on purpose (numpy, PIL, transformers): it runs where igpt_jax is not installed.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from transformers import BatchFeature, ImageGPTImageProcessor

VIEW_KEYS = ("short_side", "crop_box", "resolution", "channels")


def centre_square(image: Image.Image, side: int) -> np.ndarray:
  """The short side resized (bicubic, up or down) to `side`, then the centre square: how
  igpt_jax stores full-size images."""
  w, h = image.size
  scale = side / min(w, h)
  image = image.resize((max(side, round(w * scale)), max(side, round(h * scale))),
                       Image.BICUBIC)
  w, h = image.size
  left, top = (w - side) // 2, (h - side) // 2
  return np.asarray(image.crop((left, top, left + side, top + side)), np.uint8)


def area_matrix(lo: float, hi: float, size: int, out: int) -> np.ndarray:
  """[out, size]: how much of output pixel j's footprint source pixel k covers, for a crop
  [lo, hi] of a `size`-pixel side (fractions), normalised per output pixel."""
  width = np.float32((hi - lo) * size / out)
  start = np.float32(lo * size) + np.arange(out, dtype=np.float32) * width
  k = np.arange(size, dtype=np.float32)
  overlap = np.clip(np.minimum(start[:, None] + width, k + 1) - np.maximum(start[:, None], k),
                    0, None)
  return overlap / np.maximum(overlap.sum(-1, keepdims=True), 1e-12)


def view_levels(image: np.ndarray, crop_box, resolution: int) -> np.ndarray:
  """uint8 [H, W, C] -> uint8 [r, r, C]: the crop box averaged down by area, rounded half to
  even (as igpt_jax's JAX transform)."""
  y1, x1, y2, x2 = crop_box
  rows = area_matrix(y1, y2, image.shape[0], resolution)
  cols = area_matrix(x1, x2, image.shape[1], resolution)
  x = np.einsum("rh,hwc->rwc", rows, image.astype(np.float32))
  x = np.einsum("rwc,sw->rsc", x, cols)
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


class IgptJaxImageProcessor(ImageGPTImageProcessor):
  """ImageGPTImageProcessor's settings and palette, with igpt_jax's view of an image:
  `short_side` (None: images are used as given, only their centre square), `crop_box`
  (y1, x1, y2, x2 as fractions of that square), `resolution` and `channels` (1: luma)."""

  def __init__(self, clusters=None, short_side=None, crop_box=(0.0, 0.0, 1.0, 1.0),
               resolution=32, channels=3, **kwargs):
    super().__init__(clusters=clusters, **kwargs)
    self.short_side, self.crop_box = short_side, tuple(crop_box)
    self.resolution, self.channels = resolution, channels

  def levels(self, image) -> np.ndarray:
    """One image (PIL, or uint8 [H, W], [H, W, C]) -> uint8 [r, r, 3] as the model saw it."""
    if not isinstance(image, Image.Image):
      array = np.asarray(image)
      if array.dtype != np.uint8:
        raise ValueError(f"Images are uint8 pixels (or PIL images), got {array.dtype}.")
      image = Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1
                              else array)
    # A gray model's images are luma (PIL's "L") before any resize, as in igpt_jax.
    image = image.convert("L" if self.channels == 1 else "RGB")
    if self.short_side:
      square = centre_square(image, int(self.short_side))
    else:
      array = np.asarray(image, np.uint8)
      h, w = array.shape[:2]
      side = min(h, w)
      top, left = (h - side) // 2, (w - side) // 2
      square = array[top:top + side, left:left + side]
    levels = view_levels(square.reshape(*square.shape[:2], -1), self.crop_box,
                         int(self.resolution))
    return np.repeat(levels, 3, -1) if levels.shape[-1] == 1 else levels

  def tokens(self, levels: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> the nearest palette colour of each pixel, in the palette's [-1, 1]."""
    clusters = np.asarray(self.clusters, np.float32)
    x = levels.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    d = ((x[..., None, :] - clusters) ** 2).sum(-1)
    return d.argmin(-1).reshape(*levels.shape[:-3], -1)

  def __call__(self, images, return_tensors=None, **kwargs):
    return self.preprocess(images, return_tensors=return_tensors)

  def preprocess(self, images, return_tensors=None, **kwargs):
    """images: one or a list -> BatchFeature {'input_ids': [N, r * r]} (the model's tokens;
    the classifier reads [sos] + tokens[:-1], see the model card)."""
    if not isinstance(images, (list, tuple)):
      images = [images]
    ids = np.stack([self.tokens(self.levels(im)) for im in images]).astype(np.int64)
    return BatchFeature({"input_ids": ids}, tensor_type=return_tensors)
