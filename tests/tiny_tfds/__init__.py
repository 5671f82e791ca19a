"""A tiny TFDS data set built from local files: exercises TFDS's real download-and-prepare
path (builder, download manager, example writer, and every import they need) offline, as
imagenet2012 does from its manual download directory.

Manual files: <data_dir>/downloads/manual/{train,test}/<label>_<i>.png
"""
import tensorflow_datasets as tfds


class IgptTinyShapes(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "PNG files under downloads/manual/{train,test}/<label>_<i>.png"

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(names=["dark", "light"]),
    }), supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(dl_manager.manual_dir / split)
            for split in ("train", "test")}

  def _generate_examples(self, directory):
    for path in sorted(directory.glob("*.png")):
      yield path.name, {"image": path, "label": int(path.name.split("_")[0])}
