"""Stage fit_palette: k-means on a pixel sample of the pretraining split -> palette.npz."""

from __future__ import annotations

import math

import numpy as np

from igpt_jax import config as config_lib
from igpt_jax import distributed
from igpt_jax import palette as palette_lib
from igpt_jax import workdir as workdir_lib
from igpt_jax.data import sources, transform
from igpt_jax.stages import prepare


def run(config, workdir, log=print) -> dict:
  """Pixels are taken from images at the model's input resolution, viewed as evaluation sees
  them (a palette fitted at storage resolution would see colours that resizing averages away).
  Only the sampled images are read. Process 0 fits and writes; the others wait for it.

  A workdir whose checkpoints were trained with its palette keeps it: another one would make
  them unreadable (every stage checks the palette a checkpoint was trained with)."""
  path = workdir_lib.path(workdir) / palette_lib.PALETTE_FILE
  trained = workdir_lib.has_checkpoints(workdir)
  if trained and path.exists():
    raise config_lib.UserError(
        f"{path} is the palette the checkpoints in {trained[0]} were trained with; fitting "
        "another would make them unusable. Use a new --workdir to fit a new palette.")
  config = prepare.resolved(config, workdir, log=log)  # TFDS: prepared first, once
  distributed.on_chief("fit_palette", lambda: _fit_and_save(config, path, log))
  centers = palette_lib.Palette.load(path).centers
  return {"stage": "fit_palette", "palette": str(path), "k": config.palette.k,
          "channels": int(centers.shape[1])}


def _fit_and_save(config, path, log) -> None:
  """Process 0's work: k-means on a pixel sample; a preemption stops it between iterations."""
  data = sources.load(config, "pretrain", log=log)
  res = config.data.resolution
  num_images = min(len(data), max(4 * math.ceil(config.palette.samples / res ** 2), 1000))
  rng = np.random.default_rng([config.seed, 0xC0102])
  chosen = np.sort(rng.choice(len(data), num_images, replace=False))
  augment = transform.resolve_augment(config.data.augment, data.full_size)
  small = transform.pixels_at_resolution(np.asarray(data.images[chosen]),
                                         transform.eval_boxes(num_images, augment), res)
  log(f"Fitting a {config.palette.k}-colour palette on {config.palette.samples} pixels of "
      f"{num_images} images of {data.name} at {res}x{res}.")
  pixels = palette_lib.sample_pixels(small, config.palette.samples, seed=config.seed)
  stop = lambda _: distributed.PREEMPTION.raise_if_requested("fit_palette")  # noqa: E731
  centers = palette_lib.fit(pixels, config.palette.k, seed=config.seed,
                            iters=config.palette.iters, log=log, on_iteration=stop)
  distinct = len(np.unique(pixels, axis=0))
  if distinct < config.palette.k:  # k-means can only repeat colours past the distinct ones
    used = len(np.unique(palette_lib.quantize_np(pixels, centers)))
    log(f"warning: the {config.palette.samples} pixels sampled have {distinct} distinct colours, "
        f"so {config.palette.k - used} of the palette's {config.palette.k} colours are the "
        f"nearest colour of no pixel (tokens no image uses); --config.palette.k={distinct} "
        "gives every pixel its own colour.")
  workdir_lib.save_palette(palette_lib.Palette(centers, dataset=data.name, seed=config.seed),
                           path)
  log(f"Palette written to {path}")


def ensure(config, workdir, log=print) -> dict | None:
  """Fits the default palette when it is missing (process 0 fits, the others wait); a
  configured palette.path is never fitted over. The stage's result, or None if nothing ran."""
  where = workdir_lib.palette_path(config, workdir)
  if not config.palette.path and distributed.any_process(not where.exists()):
    log(f"No palette at {where}; fitting one first (stage fit_palette).")
    return run(config, workdir, log=log)
  return None
