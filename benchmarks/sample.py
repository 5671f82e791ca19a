"""Cached sampling throughput: igpt_jax vs transformers' ImageGPTForCausalImageModeling.generate.

Same weights (a random transformers model converted with igpt_jax.hf), same shape, batch and
sampling (temperature 1, full distribution), full images from the start token, both with their
key/value caches; alternating runs in one process, median of the repeats, compilation excluded.
Prints one JSON line last; `ratio` = ours / transformers tokens/s (higher is better).

  .venv/bin/python benchmarks/sample.py [--layers 4 --d_model 256 --heads 8 --resolution 32 --batch 8]
"""
import argparse
import tempfile
import warnings

import numpy as np

import reference as reference_lib  # benchmarks/reference.py


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  reference_lib.add_shape_args(parser)
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  warnings.filterwarnings("ignore")
  import jax
  import torch

  from igpt_jax import hf, sample

  seq = args.resolution ** 2
  ref = reference_lib.transformers_model(args).eval()
  with tempfile.TemporaryDirectory() as d:
    ref.save_pretrained(d)
    _, model = hf.from_pretrained(d)

  def ours(seed):
    return np.asarray(sample.generate(model, args.batch, jax.random.key(seed)))

  def reference(seed):
    torch.manual_seed(seed)
    start = torch.full((args.batch, 1), 512)
    with torch.no_grad():
      out = ref.generate(input_ids=start, max_length=seq + 1, do_sample=True, top_k=0,
                         temperature=1.0, use_cache=True, pad_token_id=512)
    return out[:, 1:].numpy()

  assert ours(0).shape == reference(0).shape == (args.batch, seq)  # warm-up, compilation
  seconds = reference_lib.median_seconds(
      {"igpt_jax": lambda i: ours(i + 1), "transformers": lambda i: reference(i + 1)}, args.repeats)
  reference_lib.report(
      "sample", args.batch * seq, seconds, layers=args.layers, d_model=args.d_model,
      heads=args.heads, tokens_per_image=seq, batch=args.batch,
      device=jax.devices()[0].device_kind)

if __name__ == "__main__":
  main()
