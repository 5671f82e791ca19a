"""Where images come from: one module per `data.source` (fashion_mnist, folder, npz for
'numpy', tfds, prepared), each a `Source` (base.py), looked up here by name -- the one place
that reads data.source. Adding a source is a module with its class and a line in `SOURCES`.

Every source yields an `ImageSet`: uint8 images [N, H, W, C] with random access by index
(what lets the pipeline make the example order a pure function of (seed, step)) plus integer
labels. A prepared set is read lazily; the other sources load into memory and suit small data
(Fashion-MNIST, CIFAR, a numpy array); prepare anything larger. `load` gives a role's split
with validation held out of train (base.py says how).
"""

from __future__ import annotations

from igpt_jax.data.sources.base import (ROLES, SPLIT_RULES, SPLIT_SEED, DataError, ImageSet,
                                        Source, from_arrays, holdout, holdout_keyed,
                                        storage_side, to_channels)
from igpt_jax.data.sources.fashion_mnist import FashionMnist, fashion_mnist_dir
from igpt_jax.data.sources.folder import Folder
from igpt_jax.data.sources.npz import Numpy
from igpt_jax.data.sources.prepared import Prepared
from igpt_jax.data.sources.tfds import Tfds

__all__ = ["DataError", "ImageSet", "ROLES", "SOURCES", "SPLIT_RULES", "SPLIT_SEED", "Source",
           "check_fits_config", "describe", "fashion_mnist_dir", "from_arrays", "holdout",
           "holdout_keyed", "load", "load_split", "source_of", "split_rule", "split_seed",
           "storage_side", "to_channels", "validation_fraction"]

SOURCES = {source.name: source for source in (Prepared, FashionMnist, Tfds, Folder, Numpy)}


def source_of(config, log=print) -> Source:
  """The configured source (data.source looked up in `SOURCES`)."""
  if config.data.source not in SOURCES:
    raise DataError(f"Unknown data.source {config.data.source!r}: use "
                    f"{', '.join(SOURCES)}.")
  return SOURCES[config.data.source](config, log)


def describe(data: dict) -> str:
  """What a run trained on, from its saved config's `data` section (the model card)."""
  source = SOURCES.get(data.get("source"))
  return source.describe(data) if source else str(data.get("source", "?"))


def validation_fraction(config, source: Source | None = None) -> float:
  """data.validation_fraction, or the paper's per data set (4% of ImageNet, 10% otherwise)."""
  fraction = config.data.validation_fraction
  return fraction if fraction >= 0 else (source or source_of(config)).validation_fraction()


def split_rule(config) -> str:
  """How the configured source holds validation out of train (a SPLIT_RULES name)."""
  return source_of(config).split_rule()


def split_seed(config) -> int:
  """The seed of the held-out splits: a prepared set's own (from its manifest), else SPLIT_SEED."""
  return source_of(config).split_seed()


def load_split(config, split: str, log=print) -> ImageSet:
  """A whole split of the configured source: 'pretrain' (the split pretraining reads, before
  validation is held out), 'train' or 'test'."""
  source = source_of(config, log)
  if split == "pretrain" and not source.has_pretrain_split():
    split = "train"
  return source.load_split(split)


def load(config, role: str, log=print) -> ImageSet:
  """The `role` split ('pretrain' | 'train' | 'validation' | 'test') of the configured source,
  with the validation examples held out of pretrain and train."""
  if role not in ROLES:
    raise ValueError(f"role must be one of {ROLES}, got {role!r}")
  return check_fits_config(_load_role(config, role, log), config)


def _load_role(config, role: str, log) -> ImageSet:
  source = source_of(config, log)
  if role == "test":
    return source.load_split("test")
  fraction = validation_fraction(config, source)
  if role == "validation" and fraction == 0:
    raise DataError("No validation split: --config.data.validation_fraction is 0.")
  if role == "pretrain" and source.has_pretrain_split():
    return source.load_split("pretrain")  # e.g. stl10's unlabelled split
  data = source.load_split("train")
  if fraction == 0:
    return data
  if source.split_rule() == "keyed":
    train_idx, val_idx = holdout_keyed(data.keys, fraction, source.split_seed())
  else:
    train_idx, val_idx = holdout(len(data), fraction, source.split_seed())
  if role == "validation":
    return data.subset(val_idx, f"{data.name}[validation {fraction:g}]")
  return data.subset(train_idx, f"{data.name}[without validation]")


def check_fits_config(data: ImageSet, config) -> ImageSet:
  """Refuses data a run would silently misuse: other channels than data.channels (bits/dim
  counts them), or images smaller than data.resolution (upsampled: blurred pixels the model
  was never meant to see) unless data.upsample says so."""
  d, source = config.data, source_of(config)
  side, channels = data.images.shape[1], data.images.shape[-1]
  where = source.where(data)
  if channels != d.channels:
    raise DataError(f"{where} has {channels}-channel images but data.channels={d.channels}: "
                    f"set --config.data.channels={channels}, or prepare the set again with "
                    f"--config.data.channels={d.channels}.")
  if min(data.images.shape[1:3]) < d.resolution and not d.upsample:
    hint = source.too_small_hint()
    raise DataError(f"{where} has {side}x{data.images.shape[2]} images but data.resolution="
                    f"{d.resolution} would upsample them (blurred pixels): {hint}, lower "
                    f"--config.data.resolution to at most {min(data.images.shape[1:3])}, or set "
                    "--config.data.upsample=True to accept it.")
  return data
