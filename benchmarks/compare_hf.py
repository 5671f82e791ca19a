"""Training throughput: igpt_jax vs transformers' ImageGPTForCausalImageModeling (PyTorch).

The same training work on both sides: model shape, batch, 1024-token sequences, next-token loss,
AdamW update. The reference uses transformers' defaults for this model (biases, no dropout) and
PyTorch's threads = the machine's cores; igpt_jax runs its real train step (Trainer, jitted,
donated state). Runs alternate in one process; each figure is the median step time over the
repeats after a warm-up. Prints one JSON line last; `ratio` = ours / reference tokens/s.

  .venv/bin/python benchmarks/compare_hf.py [--layers 4 --d_model 256 --heads 8 --resolution 32 --batch 8]
"""
import argparse
import os
import sys
import warnings

import numpy as np

import reference as reference_lib  # benchmarks/reference.py


def reference_step_fn(args):
  import torch

  model = reference_lib.transformers_model(args).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)

  def step(tokens):
    # transformers shifts labels itself: inputs are [start] + pixels[:-1], labels the same ids.
    ids = torch.from_numpy(np.concatenate([np.full((tokens.shape[0], 1), 512), tokens[:, :-1]], 1))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)
  return step


def ours_step_fn(args, seq):
  import jax

  from igpt_jax import sharding
  from igpt_jax import model as model_lib
  from igpt_jax import train
  from igpt_jax.config import base_config

  config = base_config()
  config.data.resolution = args.resolution
  config.model.num_layers, config.model.d_model, config.model.num_heads = (
      args.layers, args.d_model, args.heads)
  config.model.attention = args.attention
  config.model.remat = args.remat
  config.model.fused_qkv = args.fused_qkv
  config.model.scan_layers = not args.unrolled
  config.train.batch_size, config.train.lr, config.train.warmup_steps = args.batch, 1e-4, 1
  config.mesh.data = 1
  cfg = model_lib.ModelConfig.from_config(config)
  assert cfg.seq_len == seq
  trainer = train.Trainer(cfg, config, sharding.make_mesh(config.mesh, jax.devices()[:1]),
                          sharding.rules_from_config(config))
  compiled, state = trainer.compile_step(), [trainer.init_state(0)]

  def step(tokens):
    state[0], out = compiled(state[0], {"tokens": jax.device_put(tokens, trainer.batch_sharding)})
    return float(out["loss"])
  return step


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  reference_lib.add_shape_args(parser)
  parser.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--attention", default="blocked", choices=("xla", "blocked"),
                      help="igpt_jax attention (blocked: causal blocks, the CPU choice)")
  parser.add_argument("--remat", default="dots_with_no_batch_dims_saveable",
                      help="igpt_jax model.remat (recomputing the elementwise work is cheaper "
                           "than storing and re-reading it on CPUs)")
  parser.add_argument("--fused_qkv", action="store_true")
  parser.add_argument("--unrolled", action="store_true")
  args = parser.parse_args()
  warnings.filterwarnings("ignore")
  import torch

  torch.set_num_threads(os.cpu_count())
  seq = args.resolution ** 2
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, 512, (args.batch, seq)).astype(np.int32) for _ in range(2)]
  steps = {"igpt_jax": ours_step_fn(args, seq), "transformers": reference_step_fn(args)}
  for fn in steps.values():
    fn(batches[0])  # warm-up: compilation, allocator, thread pools
  seconds = reference_lib.median_seconds(
      {name: (lambda i, fn=fn: fn(batches[i % 2])) for name, fn in steps.items()},
      args.repeats, args.steps)
  import jax
  reference_lib.report(
      "compare_hf", args.batch * seq, seconds, layers=args.layers, d_model=args.d_model,
      heads=args.heads, seq_len=seq, batch=args.batch, attention=args.attention,
      remat=args.remat, fused_qkv=args.fused_qkv, unrolled=args.unrolled,
      device=jax.devices()[0].device_kind, cpu_count=os.cpu_count())

if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
