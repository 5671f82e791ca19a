"""data.source='prepared': a set the prepare stage wrote (data.prepared, local or gs://), read
lazily -- `pread` or ranged reads of the rows asked for -- so host memory does not grow with
the data set. Its manifest says what it holds: source, splits, side, class names, split seed."""

from __future__ import annotations

import functools

from igpt_jax.data import prepared
from igpt_jax.data.sources import folder, tfds
from igpt_jax.data.sources.base import (SPLIT_RULES, SPLIT_SEED, DataError, ImageSet, Source,
                                        storage_side)


class Prepared(Source):
  name = "prepared"
  defining_fields = ("data.source", "data.prepared")

  @functools.cached_property
  def manifest(self) -> dict:
    """The set's manifest, read once per source."""
    if not self.d.prepared:
      raise DataError("data.source='prepared' needs --config.data.prepared=DIR (a directory "
                      "made by --config.stage=prepare).")
    return prepared.read_manifest(self.d.prepared)

  def has_pretrain_split(self) -> bool:
    return "pretrain" in self.manifest["splits"]

  def validation_fraction(self) -> float:
    name = self.manifest["source"].removeprefix("tfds:")
    imagenet_sized = (self.manifest["source"].startswith("folder:") and
                      self.manifest["splits"].get("train", {}).get("count", 0)
                      >= folder.IMAGENET_SIZED)
    return 0.04 if name in tfds.IMAGENET_NAMES or imagenet_sized else 0.1

  def split_seed(self) -> int:
    return int(self.manifest.get("split_seed", SPLIT_SEED))

  def split_rule(self) -> str:
    """The manifest's: a set prepared before keys were stored keeps holding out by count."""
    return "keyed" if self.manifest.get("split_rule") == SPLIT_RULES["keyed"] else "permutation"

  def load_split(self, split: str) -> ImageSet:
    self.manifest  # a missing data.prepared, said in one line
    return load_prepared(self.d.prepared, split, verify=self.d.verify)

  def layout(self, pool):
    raise DataError("data.source='prepared' is already prepared: set data.source to the "
                    "original (tfds, folder, numpy, fashion_mnist) to prepare it.")

  def where(self, data: ImageSet) -> str:
    return f"the prepared data set at {self.d.prepared}"

  def too_small_hint(self) -> str:
    return (f"prepare it for resolution {self.d.resolution} (stored side "
            f"{storage_side(self.d.resolution)} for full-size images)")

  @classmethod
  def describe(cls, data: dict) -> str:
    return f"prepared `{data['prepared']}`" if data.get("prepared") else cls.name


def load_prepared(directory: str, split: str, verify: bool = False) -> ImageSet:
  """A split of a prepared data set, read lazily (see `prepared.ShardedRows`). Its shards'
  sizes are checked on open (one stat each); `verify` also checks their sha256 (reads all)."""
  manifest = prepared.read_manifest(directory)
  if split not in manifest["splits"]:
    raise DataError(f"The prepared data set at {directory} has no {split!r} split (it has "
                    f"{', '.join(manifest['splits'])}).")
  info = manifest["splits"][split]
  side, channels = manifest["side"], manifest["channels"]
  prepared.check_shards(directory, info["shards"], (side, side, channels))
  if verify:
    bad = prepared.verify(directory, [split])
    if bad:
      raise DataError(f"The prepared data set at {directory} is damaged: shard(s) "
                      f"{', '.join(bad)} do not match the manifest's sha256. Prepare it again "
                      "(--config.stage=prepare --config.data.overwrite=True).")
  rows = prepared.ShardedRows(directory, info["shards"], (side, side, channels))
  return ImageSet(rows, prepared.read_labels(directory, info["shards"]),
                  manifest["class_names"], f"prepared:{directory}:{split}",
                  skipped_files=info["skipped"], full_size=manifest["full_size"],
                  decoded_side=side if manifest["full_size"] or str(
                      manifest["source"]).startswith("folder:") else 0,
                  keys=prepared.read_keys(directory, info["shards"]))
