"""Palette quantization throughput: igpt_jax vs transformers' ImageGPTImageProcessor.

Same images (scikit-image's bundled photographs cut into 32x32 RGB patches), same 512 centres,
all from uint8 pixels to token ids, alternating runs in one process. Our three exact paths:
brute force (jitted JAX, all 512 distances per pixel), the candidate-cell table, and the uint8
lookup table built from it (a one-off cost per palette, reported as setup_s). Prints one JSON
line last; `ratio` = our lookup-table path / transformers, steady state (higher is better).

  .venv/bin/python benchmarks/quantize.py [--images 512] [--repeats 5]
"""
import argparse
import json
import statistics
import time
import warnings

import numpy as np


def patches():
  import skimage.data
  out = []
  for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry"):
    im = getattr(skimage.data, name)()[..., :3]
    h, w = im.shape[0] // 32 * 32, im.shape[1] // 32 * 32
    out.append(im[:h, :w].reshape(h // 32, 32, w // 32, 32, 3).swapaxes(1, 2).reshape(-1, 32, 32, 3))
  return np.concatenate(out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  warnings.filterwarnings("ignore")
  import jax
  import transformers

  from igpt_jax import palette as P

  images = patches()[: args.images]
  centers = P.fit(P.sample_pixels(images, 50_000), 512, seed=0, iters=10)
  processor_cls = getattr(transformers, "ImageGPTImageProcessorPil", transformers.ImageGPTImageProcessor)
  processor = processor_cls(clusters=centers, do_resize=False)

  start = time.perf_counter()
  quantizer = P.Quantizer(centers)
  quantizer.uint8_lut()
  setup_s = time.perf_counter() - start
  n = len(images)
  paths = {
      "brute_force": lambda: np.asarray(P.quantize_jax(P.to_unit_scale(images), centers)),
      "cell_table": lambda: np.asarray(quantizer(P.to_unit_scale(images))),
      "lookup_table": lambda: quantizer.quantize_uint8(images),
      "transformers": lambda: processor(list(images), return_tensors="np")["input_ids"],
  }
  out = {name: np.asarray(fn()).reshape(n, -1) for name, fn in paths.items()}  # also warm-up
  for name in ("cell_table", "lookup_table"):
    assert np.array_equal(out[name], out["brute_force"]), f"{name} differs from brute force"
  times = {name: [] for name in paths}
  for _ in range(args.repeats):
    for name, fn in paths.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  rate = {name: n / statistics.median(t) for name, t in times.items()}
  for name, r in rate.items():
    print(f"{name:>13}: {r:10.0f} images/s")
  print(json.dumps({
      "benchmark": "quantize", "images": n, "resolution": 32, "k": 512,
      "device": jax.devices()[0].device_kind, "reference": processor_cls.__name__,
      **{f"{name}_images_per_s": round(r, 1) for name, r in rate.items()},
      "setup_s": round(setup_s, 2),
      "token_agreement_with_transformers": float(np.mean(out["brute_force"] == out["transformers"])),
      "ratio_brute_force": round(rate["brute_force"] / rate["transformers"], 2),
      "ratio": round(rate["lookup_table"] / rate["transformers"], 2)}))


if __name__ == "__main__":
  main()
