"""README's "Your own images": a folder of 32x32 RGB photo crops in 3 class folders through the
quick start command (stage all), a later stage with only --workdir, and the export."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, xla_flags

skimage_data = pytest.importorskip("skimage.data")

# The quick start's config at test size (the README's command, smaller).
TINY = ["--config.model.num_layers=2", "--config.model.d_model=32", "--config.model.num_heads=4",
        "--config.data.resolution=8", "--config.palette.k=16", "--config.palette.samples=20000",
        "--config.palette.iters=5", "--config.train.steps=4", "--config.train.batch_size=16",
        "--config.train.log_every=2", "--config.train.eval_every=2",
        "--config.finetune.steps=2", "--config.finetune.eval_every=2", "--config.probe.steps=30",
        "--config.sample.num=2", "--config.sample.completions=2"]


def photo_crops(root, per_class=40, side=32):
  """32x32 crops of three of scikit-image's photographs, a class folder each."""
  rng = np.random.default_rng(0)
  for name in ("astronaut", "chelsea", "coffee"):
    photo = getattr(skimage_data, name)()
    (root / name).mkdir(parents=True)
    for i in range(per_class):
      y, x = rng.integers(0, photo.shape[0] - side), rng.integers(0, photo.shape[1] - side)
      Image.fromarray(photo[y:y + side, x:x + side]).save(root / name / f"{i}.png")


def igpt(*args):
  proc = subprocess.run([sys.executable, "-m", "igpt_jax.main", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600,
                        env={**os.environ, "XLA_FLAGS": xla_flags(), "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_own_images_from_a_folder_to_a_report_and_a_hugging_face_model(tmp_path):
  photos, run = tmp_path / "photos", tmp_path / "run"
  photo_crops(photos)
  result = igpt("--config=folder", f"--config.data.path={photos}", f"--workdir={run}", *TINY)
  assert result["stage"] == "all" and (run / "report.md").exists()
  assert 0 < result["test_bits_per_dim"] < 8 and 0 <= result["best_accuracy"] <= 1
  probe = json.loads((run / "probe" / "results.json").read_text())
  assert probe["test_examples"] + probe["train_examples"] < 120  # the folder's own splits
  assert f"On {probe['test_examples']} test images an accuracy is uncertain by about +-" in (
      run / "probe" / "results.md").read_text()  # a handful of images: said
  # A later stage: --workdir alone (the run's config, the folder and tiny sizes included).
  again = igpt(f"--workdir={run}", "--config.stage=probe")
  assert again["best_accuracy"] == result["best_accuracy"]
  exported = igpt(f"--workdir={run}", "--config.stage=export")
  hf_config = json.loads((run / "hf" / "config.json").read_text())
  assert exported["classes"] == 3
  assert hf_config["id2label"] == {"0": "astronaut", "1": "chelsea", "2": "coffee"}
  card = (run / "hf" / "README.md").read_text()
  assert f"| data | folder `{photos}` |" in card  # not the default TFDS name


def photos_of_any_shape(root, split, per_class, seed):
  """Crops of 24..64 x 24..64 pixels (most not square) of three photographs, as
  root/<split>/<class>/*.png: the centre square, short-side resize and evaluation crop matter."""
  rng = np.random.default_rng(seed)
  for name in ("astronaut", "chelsea", "coffee"):
    photo = getattr(skimage_data, name)()
    (root / split / name).mkdir(parents=True)
    for i in range(per_class[name] if isinstance(per_class, dict) else per_class):
      h, w = rng.integers(24, 65, 2)
      y, x = rng.integers(0, photo.shape[0] - h), rng.integers(0, photo.shape[1] - w)
      Image.fromarray(photo[y:y + h, x:x + w]).save(root / split / name / f"{i}.png")


def test_the_exported_classifier_predicts_what_evaluate_predicts_from_raw_photos(tmp_path):
  """Fine-tuned on a folder laid out by split, exported: transformers' classifier, fed the raw
  test files through the exported image processor, predicts the class `evaluate` predicts for
  at least 99% of 256 test images (the head has no bias; the processor crops and resizes as
  training did). The stock processor, which squashes the whole image, is shown to differ."""
  import torch
  import transformers

  from igpt_jax.data.sources import folder

  photos, run = tmp_path / "photos", tmp_path / "run"
  photos_of_any_shape(photos, "train", 40, seed=0)
  photos_of_any_shape(photos, "test", {"astronaut": 86, "chelsea": 85, "coffee": 85}, seed=1)
  common = [f"--workdir={run}", *TINY, "--config.finetune.steps=6"]
  igpt("--config=folder", f"--config.data.path={photos}", "--config.stage=pretrain", *common)
  igpt(f"--workdir={run}", "--config.stage=finetune")
  evaluated = igpt(f"--workdir={run}", "--config.stage=evaluate")
  ours = np.load(evaluated["classifier_predictions"])
  assert len(ours["predictions"]) == 256
  assert np.bincount(ours["predictions"]).max() < 200  # not one class for all: agreement tells
  exported = igpt(f"--workdir={run}", "--config.stage=export")
  assert not (run / "hf" / "model.safetensors").read_bytes().count(b"score.bias")

  files, labels, _ = folder.folder_files(str(photos), "test")  # evaluate's order
  np.testing.assert_array_equal(labels, ours["labels"])
  raw = [np.asarray(Image.open(f).convert("RGB")) for f in files]  # uint8, as on disk
  processor = transformers.AutoImageProcessor.from_pretrained(exported["path"],
                                                              trust_remote_code=True)
  classifier = transformers.ImageGPTForImageClassification.from_pretrained(exported["path"])

  def predict(ids):
    ids = torch.as_tensor(ids)
    shifted = torch.cat([torch.full_like(ids[:, :1], 16), ids[:, :-1]], 1)  # [sos] + x[:-1]
    with torch.no_grad():
      return classifier.eval()(shifted).logits.argmax(-1).numpy()

  theirs = predict(processor(raw, return_tensors="np")["input_ids"])
  agree = np.mean(theirs == ours["predictions"])
  assert agree >= 0.99, agree
  assert evaluated["classifier_test_accuracy"] == np.mean(ours["predictions"] == labels)
  stock = transformers.ImageGPTImageProcessor.from_pretrained(exported["path"])
  squashed = stock(raw, return_tensors="np", input_data_format="channels_last")["input_ids"]
  assert np.mean(squashed != processor(raw, return_tensors="np")["input_ids"]) > 0.05
