"""What the transformers comparisons share: the model-shape flags, the reference model, and
alternating timing with one report format."""
import json
import statistics
import time


def add_shape_args(parser) -> None:
  """The CPU shape of record: 4 layers, d=256, 8 heads, 32x32 (1024 tokens), batch 8."""
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--d_model", type=int, default=256)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--resolution", type=int, default=32)
  parser.add_argument("--batch", type=int, default=8)


def transformers_model(args):
  """transformers' ImageGPTForCausalImageModeling of that shape: 512 colours + start token,
  no dropout, seeded."""
  import torch
  import transformers
  torch.manual_seed(0)
  return transformers.ImageGPTForCausalImageModeling(transformers.ImageGPTConfig(
      n_layer=args.layers, n_embd=args.d_model, n_head=args.heads,
      n_positions=args.resolution ** 2, vocab_size=513, resid_pdrop=0.0, embd_pdrop=0.0,
      attn_pdrop=0.0))


def median_seconds(fns: dict, repeats: int, calls: int = 1) -> dict:
  """Median seconds per call of each fn(call_index); the fns take turns every `calls` calls, so
  drift in the machine's speed hits both sides alike."""
  times = {name: [] for name in fns}
  for r in range(repeats):
    for name, fn in fns.items():
      for i in range(calls):
        start = time.perf_counter()
        fn(r * calls + i)
        times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def report(benchmark: str, tokens_per_call: int, seconds: dict, **fields) -> None:
  """A line per side, then one JSON line: tokens/s of each and ratio = igpt_jax / transformers."""
  rate = {name: tokens_per_call / s for name, s in seconds.items()}
  for name, value in rate.items():
    print(f"{name:>13}: {value:8.0f} tokens/s  (median call {seconds[name]:.3f} s)")
  print(json.dumps({"benchmark": benchmark, **fields,
                    "igpt_jax_tokens_per_s": round(rate["igpt_jax"], 1),
                    "transformers_tokens_per_s": round(rate["transformers"], 1),
                    "ratio": round(rate["igpt_jax"] / rate["transformers"], 2)}))
