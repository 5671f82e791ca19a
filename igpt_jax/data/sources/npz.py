"""data.source='numpy': an .npz of train_images/test_images (uint8 [N, H, W(, C)]), with
optional train_labels/test_labels and class_names."""

from __future__ import annotations

import os

import numpy as np

from igpt_jax.data.sources.base import DataError, ImageSet, Source, from_arrays


class Numpy(Source):
  name = "numpy"

  def load_split(self, split: str) -> ImageSet:
    d = self.d
    if not d.path or not os.path.exists(d.path):
      raise DataError(f"data.source='numpy' needs --config.data.path to an .npz with "
                      f"train_images/test_images (and _labels, class_names); {d.path!r} does "
                      "not exist.")
    arrays = np.load(d.path)
    if f"{split}_images" not in arrays:
      raise DataError(f"{d.path} has no {split}_images array.")
    labels = arrays[f"{split}_labels"] if f"{split}_labels" in arrays else None
    names = [str(n) for n in arrays["class_names"]] if "class_names" in arrays else None
    return from_arrays(arrays[f"{split}_images"], labels, class_names=names, channels=d.channels,
                       name=f"numpy:{d.path}:{split}")
