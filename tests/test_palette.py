"""The k-means palette: better than a uniform grid on real images, identical across backends."""
import json

import numpy as np
import pytest

from igpt_jax.config import UserError

from igpt_jax import palette as P
from igpt_jax import workdir as workdir_lib
from igpt_jax.data import sources
from igpt_jax.data.sources import fashion_mnist as fmnist_source


def skimage_patches():
  """scikit-image's bundled colour photographs cut into 32x32 patches."""
  skimage_data = pytest.importorskip("skimage.data")
  patches = []
  for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry"):
    im = getattr(skimage_data, name)()[..., :3]
    h, w = im.shape[0] // 32 * 32, im.shape[1] // 32 * 32
    patches.append(im[:h, :w].reshape(h // 32, 32, w // 32, 32, 3).swapaxes(1, 2).reshape(-1, 32, 32, 3))
  return np.concatenate(patches)


def fashion_mnist_train():
  directory = sources.fashion_mnist_dir()
  if directory is None:
    pytest.skip("Debian's dataset-fashion-mnist is not installed")
  return fmnist_source.load_fashion_mnist(directory, "train", channels=1).images


def reconstruction_mse(images, centers):
  tokens = P.quantize_np(P.to_unit_scale(images), centers)
  return float(np.mean((P.dequantize(tokens, centers).astype(np.float64) - images) ** 2))


@pytest.mark.parametrize("data,k", [("fashion_mnist", 16), ("skimage", 512)])
def test_kmeans_beats_uniform_grid(data, k):
  images = fashion_mnist_train()[:5000] if data == "fashion_mnist" else skimage_patches()
  centers = P.fit(P.sample_pixels(images, 60_000, seed=0), k, seed=0, iters=15)
  assert centers.shape == (k, images.shape[-1]) and np.abs(centers).max() <= 1.0
  held_out = images[-300:]
  fitted, grid = reconstruction_mse(held_out, centers), reconstruction_mse(held_out, P.uniform_grid(k, images.shape[-1]))
  print(f"{data}: k-means MSE {fitted:.2f} vs uniform grid {grid:.2f}")
  assert fitted < grid


def test_fit_is_deterministic_for_a_seed():
  pixels = P.to_unit_scale(np.random.default_rng(0).integers(0, 256, (4000, 3), dtype=np.uint8))
  a, b = P.fit(pixels, 32, seed=3, iters=5), P.fit(pixels, 32, seed=3, iters=5)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, P.fit(pixels, 32, seed=4, iters=5))


def test_numpy_jax_tf_quantizers_agree_exactly():
  images = skimage_patches()[:300]
  centers = P.fit(P.sample_pixels(images, 30_000), 512, iters=5)
  pixels = P.to_unit_scale(images)
  ours = P.quantize_np(pixels, centers)
  np.testing.assert_array_equal(np.asarray(P.quantize_jax(pixels, centers)), ours)
  np.testing.assert_array_equal(P.quantize_tf(pixels, centers).numpy(), ours)
  # Grayscale too.
  gray = fashion_mnist_train()[:200, ..., None] if sources.fashion_mnist_dir() else images[..., :1]
  g_centers = P.fit(P.sample_pixels(gray, 20_000), 16, iters=5)
  g = P.to_unit_scale(gray)
  np.testing.assert_array_equal(P.quantize_tf(g, g_centers).numpy(), P.quantize_np(g, g_centers))


def test_dequantize_uses_release_rounding():
  centers = np.array([[-1.0, 0.0, 1.0], [0.5, -0.5, 0.25]], np.float32)
  np.testing.assert_array_equal(P.dequantize(np.array([0, 1]), centers),
                                np.rint(127.5 * (centers + 1)).astype(np.uint8))


def test_save_load_and_foreign_formats(tmp_path):
  centers = P.uniform_grid(8, 3)
  pal = P.Palette(centers, dataset="cifar10", seed=7)
  workdir_lib.save_palette(pal, str(tmp_path / "palette.npz"))
  back = P.Palette.load(str(tmp_path / "palette.npz"))
  np.testing.assert_array_equal(back.centers, centers)
  assert (back.k, back.channels, back.dataset, back.seed) == (8, 3, "cifar10", 7)
  np.save(tmp_path / "kmeans_centers.npy", centers)  # OpenAI's released format
  np.testing.assert_array_equal(P.Palette.load(str(tmp_path / "kmeans_centers.npy")).centers, centers)
  (tmp_path / "preprocessor_config.json").write_text(json.dumps({"clusters": centers.tolist()}))
  np.testing.assert_array_equal(P.Palette.load(str(tmp_path / "preprocessor_config.json")).centers,
                                centers)


def test_huggingface_processor_clusters_load():
  transformers = pytest.importorskip("transformers")
  centers = P.uniform_grid(8, 3)
  processor = transformers.ImageGPTImageProcessor(clusters=centers)
  import tempfile
  with tempfile.TemporaryDirectory() as d:
    processor.save_pretrained(d)
    np.testing.assert_allclose(P.Palette.load(f"{d}/preprocessor_config.json").centers, centers)


def test_bad_palettes_fail_clearly(tmp_path):
  # User errors: the command line prints them as one line `error: ...`.
  with pytest.raises(UserError, match="fit_palette"):
    P.Palette.load(str(tmp_path / "missing.npz"))
  np.save(tmp_path / "wide.npy", np.zeros((4, 3)) + 5.0)
  with pytest.raises(UserError, match=r"\[-1, 1\]"):
    P.Palette.load(str(tmp_path / "wide.npy"))
  with pytest.raises(UserError, match="channels"):
    P.Palette(P.uniform_grid(8, 3)).check_channels(1)


def test_fast_quantizer_is_exactly_the_brute_force():
  images = skimage_patches()[:200]
  centers = P.fit(P.sample_pixels(images, 30_000), 512, iters=5)
  q = P.Quantizer(centers)
  assert q.max_candidates < 512  # it prunes
  pixels = P.to_unit_scale(images)
  ref = P.quantize_np(pixels, centers)
  np.testing.assert_array_equal(np.asarray(q(pixels)), ref)
  rnd = np.random.default_rng(0).uniform(-1, 1, (50_000, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(q(rnd)), P.quantize_np(rnd, centers))
  np.testing.assert_array_equal(q.quantize_uint8(images), ref)
  # Grayscale: a 256-entry table.
  g_centers = P.uniform_grid(16, 1)
  gray = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  np.testing.assert_array_equal(P.Quantizer(g_centers).quantize_uint8(gray),
                                P.quantize_np(P.to_unit_scale(gray), g_centers))


def test_a_palette_with_more_colours_than_the_data_has_says_so(tmp_path):
  """Data with 3 grey levels and palette.k=16: k-means can only repeat colours, and a warning
  says how many repeat and which k gives every pixel its own colour."""
  from test_model import load_config

  from igpt_jax.stages import fit_palette
  levels = np.array([0, 128, 255], np.uint8)
  images = levels[np.random.default_rng(0).integers(0, 3, (64, 8, 8))]
  np.savez(tmp_path / "data.npz", train_images=images, train_labels=np.zeros(64, np.int64),
           test_images=images[:8], test_labels=np.zeros(8, np.int64))
  config = load_config("demo")
  config.data.source, config.data.path = "numpy", str(tmp_path / "data.npz")
  config.data.resolution, config.palette.samples, config.palette.iters = 8, 2000, 2
  logs = []
  fit_palette.run(config, str(tmp_path / "run"), log=logs.append)
  [warning] = [line for line in logs if line.startswith("warning:")]
  assert "have 3 distinct colours, so 13 of the palette's 16 colours are the nearest colour of " \
         "no pixel" in warning
  assert "--config.palette.k=3" in warning
