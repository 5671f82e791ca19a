"""Input pipeline throughput per host core: igpt_jax vs what a PyTorch user would write.

Both read the same prepared data set (scikit-image's bundled photographs cut into squares and
stored at twice the input side, as `prepare` stores full-size images) and turn it into palette
tokens for pretraining with the paper's augmentation (random crop of 224/U(256, 384) of the
side, resized to the input resolution), 512 colours:

- igpt_jax: `pipeline.train_batches` (step -> rows -> reads of the batch's uint8 rows -> crop
  boxes), as tf.data (parallel steps, prefetch) and as its Python twin (one step ahead in a
  thread), + `transform.Tokenizer` (crop, resize, exact lookup-table quantization, jitted; in
  training this part runs on the accelerator, here on the CPU: the worst case). Also the host
  share alone, and the host share reading the set through an fsspec URL whose local backend
  counts bytes (`counting_fs.py`: remote storage with ranged reads), with bytes read per image.
- PyTorch: a map-style Dataset whose __getitem__ does torchvision's RandomResizedCrop on the
  uint8 tensor (crop, then `F.interpolate(bilinear, antialias=True)`, which is what
  `RandomResizedCrop` calls for tensors; torchvision itself is not installed here) and a
  DataLoader whose collate_fn runs transformers' `ImageGPTImageProcessor` (normalize + colour
  quantization) on the batch.

The process is pinned to one core (`--cores`), each side gets the same cores: XLA's and torch's
thread pools, DataLoader num_workers = cores - 1 (0 for one core: work in the main process).
Prints a table, then one JSON line with images/s per core for each, `ratio` (ours, tf.data /
PyTorch)
and the host cores needed to feed one H100 at the iGPT-S and iGPT-M rates of RESULTS.md
(counting the transform on the host; in training it runs on the GPU, leaving the host only the
gather, reported as the host share).

  .venv/bin/python benchmarks/input.py [--cores 1] [--images 2048] [--batch 128] [--seconds 10]
"""
import argparse
import json
import os
import tempfile
import time
import warnings

import numpy as np

# Measured on one H100 (RESULTS.md, bf16, cuDNN flash, unrolled): tokens/s / 1024 tokens/image.
H100_IMAGES_PER_S = {"igpt_s": 622_303 / 1024, "igpt_m": 151_960 / 1024}


def photo_squares(side: int, n: int) -> np.ndarray:
  """n uint8 RGB squares of `side` pixels: random crops of the bundled photographs, resized."""
  import skimage.data
  from PIL import Image
  rng = np.random.default_rng(0)
  photos = [getattr(skimage.data, name)()[..., :3] for name in
            ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")]
  out = np.empty((n, side, side, 3), np.uint8)
  for i in range(n):
    im = photos[i % len(photos)]
    s = int(rng.integers(min(im.shape[:2]) // 3, min(im.shape[:2])))
    y, x = rng.integers(0, im.shape[0] - s + 1), rng.integers(0, im.shape[1] - s + 1)
    out[i] = np.asarray(Image.fromarray(im[y:y + s, x:x + s]).resize((side, side), Image.BICUBIC))
  return out


def prepared_set(directory: str, resolution: int, n: int):
  from igpt_jax.data import prepared, sources
  from igpt_jax.data.sources import prepared as prepared_source
  side = 2 * resolution
  images = photo_squares(side, n)
  shards = [prepared.write_shard(directory, "train", j, images[lo:lo + 1024],
                                 np.zeros(len(images[lo:lo + 1024])))
            for j, lo in enumerate(range(0, n, 1024))]
  record = prepared.settings(source="skimage", side=side, channels=3, full_size=True,
                             shard_size=1024, split_seed=sources.SPLIT_SEED)
  prepared.write_manifest(directory, settings_record=record, class_names=[],
                          splits={"train": shards})
  return prepared_source.load_prepared(directory, "train"), images


def ours(data, centers, resolution, batch, seconds, transform_on_host=True, pipeline="python"):
  """images/s of the whole path on the host, or (transform_on_host=False) of the host's share
  when the transform runs on the accelerator: step -> rows -> reads -> crop boxes."""
  from igpt_jax.data import pipeline as pipeline_lib
  from igpt_jax.data import transform
  tokenizer = transform.Tokenizer(centers, resolution)
  batches = pipeline_lib.train_batches(data, batch_size=batch, seed=0, augment="paper",
                                       pipeline=pipeline)
  tokenizer(*(next(batches)[k] for k in ("images", "boxes"))).block_until_ready()  # compile
  n, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    b = next(batches)
    if transform_on_host:
      tokenizer(b["images"], b["boxes"]).block_until_ready()
    n += batch
  return n / (time.perf_counter() - start)


class CountedRows:
  """Rows of a prepared split that count how many images were asked for."""

  def __init__(self, rows):
    self.rows, self.shape, self.dtype, self.asked = rows, rows.shape, rows.dtype, 0

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, index):
    out = self.rows[index]
    self.asked += 1 if out.ndim == 3 else len(out)
    return out


def remote(data, directory):
  """The same prepared set read through an fsspec URL whose backend counts bytes."""
  import dataclasses

  import counting_fs
  from igpt_jax.data import prepared
  manifest = prepared.read_manifest(directory)
  rows = CountedRows(prepared.ShardedRows(counting_fs.url(directory),
                                          manifest["splits"]["train"]["shards"],
                                          data.images.shape[1:]))
  return dataclasses.replace(data, images=rows), counting_fs.CountingFileSystem


def pytorch(data, centers, resolution, batch, seconds, workers):
  import torch
  import torch.nn.functional as F
  import transformers

  class Crops(torch.utils.data.Dataset):
    def __len__(self):
      return len(data)

    def __getitem__(self, i):
      image = torch.from_numpy(data.images[np.array([i])][0]).permute(2, 0, 1)  # uint8 [C, H, W]
      side = image.shape[-1]
      crop = int(round(side * 224 / float(torch.empty(()).uniform_(256, 384))))
      y, x = torch.randint(0, side - crop + 1, (2,)).tolist()
      patch = image[:, y:y + crop, x:x + crop][None].float()
      out = F.interpolate(patch, size=(resolution, resolution), mode="bilinear", antialias=True)
      return out[0].round().clamp(0, 255).to(torch.uint8)

  processor_cls = getattr(transformers, "ImageGPTImageProcessorPil",
                          transformers.ImageGPTImageProcessor)
  processor = processor_cls(clusters=centers, do_resize=False)

  def collate(images):
    pixels = [im.permute(1, 2, 0).numpy() for im in images]
    return torch.as_tensor(processor(pixels, return_tensors="np")["input_ids"])

  loader = torch.utils.data.DataLoader(Crops(), batch_size=batch, shuffle=True,
                                       num_workers=workers, collate_fn=collate,
                                       persistent_workers=workers > 0)
  it = iter(loader)
  next(it)
  n, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    try:
      tokens = next(it)
    except StopIteration:
      it = iter(loader)
      tokens = next(it)
    n += len(tokens)
  return n / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cores", type=int, default=1)
  parser.add_argument("--images", type=int, default=2048)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--seconds", type=float, default=10.0)
  parser.add_argument("--resolutions", default="32,64")
  args = parser.parse_args()
  os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:args.cores]))  # before JAX/torch
  warnings.filterwarnings("ignore")
  import torch
  torch.set_num_threads(args.cores)

  from igpt_jax import palette as P
  rows, result = [], {"cores": args.cores, "batch": args.batch}
  for res in (int(r) for r in args.resolutions.split(",")):
    with tempfile.TemporaryDirectory() as tmp:
      data, images = prepared_set(tmp, res, args.images)
      centers = P.fit(P.sample_pixels(images, 50_000), 512, seed=0, iters=10)
      far, counter = remote(data, tmp)
      for pipe in ("python", "tf.data"):
        key = f"{res}_{pipe.replace('.', '')}"
        whole = ours(data, centers, res, args.batch, args.seconds, pipeline=pipe)
        host = ours(data, centers, res, args.batch, args.seconds, False, pipeline=pipe)
        counter.reset()
        far.images.asked = 0
        remote_ips = ours(far, centers, res, args.batch, args.seconds, False, pipeline=pipe)
        per_image = counter.bytes_read / max(far.images.asked, 1)
        result[f"igpt_jax_{key}_images_per_s_per_core"] = round(whole / args.cores, 1)
        result[f"igpt_jax_{key}_host_share_images_per_s_per_core"] = round(host / args.cores, 1)
        result[f"igpt_jax_{key}_remote_host_share_images_per_s_per_core"] = round(
            remote_ips / args.cores, 1)
        result[f"igpt_jax_{key}_remote_bytes_per_image"] = round(per_image)
        rows.append((res, pipe, whole / args.cores, host / args.cores, remote_ips / args.cores,
                     per_image))
      torch_ips = pytorch(data, centers, res, args.batch, args.seconds, args.cores - 1)
    result[f"pytorch_{res}_images_per_s_per_core"] = round(torch_ips / args.cores, 1)
    best = result[f"igpt_jax_{res}_tfdata_images_per_s_per_core"] * args.cores
    result[f"ratio_{res}"] = round(best / torch_ips, 2)
    rows.append((res, "PyTorch DataLoader", torch_ips / args.cores, None, None, None))
    if res == 32:  # transform on the host too: the conservative count
      for model, rate in H100_IMAGES_PER_S.items():
        result[f"cores_per_h100_{model}"] = round(rate * args.cores / best, 2)
  print("| input | pipeline | images/s/core, all on host | host share only (transform on the "
        "accelerator) | host share, remote storage | bytes read per image, remote |")
  print("|---|---|---|---|---|---|")
  for res, pipe, whole, host, far_ips, per_image in rows:
    cells = [f"{v:,.0f}" if v is not None else "" for v in (whole, host, far_ips, per_image)]
    print(f"| {res}x{res} | {pipe} | " + " | ".join(cells) + " |")
  result["ratio"] = result.get("ratio_32")
  print(json.dumps(result))

if __name__ == "__main__":
  main()
