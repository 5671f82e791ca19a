"""Train-step throughput and MFU: the real step (forward, backward, AdamW update) on synthetic
token batches, so it runs without TensorFlow or data.

One run (one JSON line):
  python benchmarks/train.py --config configs/igpt_s.py --set model.dtype=bfloat16 \
      --set model.attention=cudnn --set train.batch_size=64

A sweep (each variant in its own process, so XLA flags and memory start clean; one JSON line each):
  python benchmarks/train.py --config configs/igpt_m.py --sweep gpu --set train.batch_size=64

The step time is the median over the timed steps after warm-up; FLOPs/token is the `plan` stage's
convention (model.flops_per_token: 6 * matmul params + causal attention), so MFU here and in the
training log agree. MFU is null on CPUs (no peak in metrics.PEAK_FLOPS).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# The flags launch/gpu_slurm.sh sets for GPU runs; the `xla_flags` sweep variant measures them.
GPU_XLA_FLAGS = "--xla_gpu_enable_latency_hiding_scheduler=true"

# name -> (overrides, extra XLA flags), each laid over SWEEP_BASE: the fastest known settings
# (one H100: bf16, cuDNN flash attention, matmul outputs saved and the rest recomputed).
SWEEPS = {
    "gpu": [
        ("float32+xla", ["model.dtype=float32", "model.attention=xla"], ""),
        ("bf16+xla", ["model.attention=xla"], ""),
        ("base", [], ""),
        ("remat_none", ["model.remat=none"], ""),
        ("remat_full", ["model.remat=full"], ""),
        ("fused_qkv", ["model.fused_qkv=True"], ""),
        ("unrolled", ["model.scan_layers=False"], ""),
        ("xla_flags", [], GPU_XLA_FLAGS),
        ("no_triton_gemm", [], "--xla_gpu_enable_triton_gemm=false"),
    ],
    "cpu": [
        ("base", [], ""),
        ("fused_qkv", ["model.fused_qkv=True"], ""),
        ("unrolled", ["model.scan_layers=False"], ""),
        ("remat_dots", ["model.remat=dots_with_no_batch_dims_saveable"], ""),
        ("bf16", ["model.dtype=bfloat16"], ""),
    ],
}
SWEEP_BASE = {"gpu": ["model.dtype=bfloat16", "model.attention=cudnn",
                      "model.remat=dots_with_no_batch_dims_saveable"], "cpu": []}


def load_config(path: str, overrides: list[str]):
  from igpt_jax.config import load_config_file
  config = load_config_file(path)
  for item in overrides:
    key, _, text = item.partition("=")
    section, _, field = key.rpartition(".")
    node = config
    for part in filter(None, section.split(".")):
      node = node[part]
    old = node[field]
    if isinstance(old, bool):
      value = text.lower() in ("1", "true", "yes")
    elif isinstance(old, (int, float)):
      value = type(old)(float(text)) if isinstance(old, int) else float(text)
    else:
      value = text
    node[field] = value
  return config


def measure(config, warmup: int, steps: int) -> dict:
  import jax

  from igpt_jax import metrics, sharding
  from igpt_jax import model as model_lib
  from igpt_jax import train

  cfg = model_lib.ModelConfig.from_config(config)
  mesh = sharding.make_mesh(config.mesh)
  trainer = train.Trainer(cfg, config, mesh, sharding.rules_from_config(config))
  t0 = time.perf_counter()
  step = trainer.compile_step()
  compile_s = time.perf_counter() - t0
  state = trainer.init_state(config.seed)
  batch_size = config.train.batch_size
  batches = [{"tokens": jax.device_put(
      jax.random.randint(jax.random.key(i), (batch_size, cfg.seq_len), 0, cfg.vocab_size),
      trainer.batch_sharding)} for i in range(2)]  # two batches, alternated: no cache effects
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    state, out = step(state, batches[i % 2])
    loss = float(out["loss"])  # waits for the step
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  tokens_per_s = batch_size * cfg.seq_len / step_s
  flops = model_lib.flops_per_token(cfg)
  kind = jax.devices()[0].device_kind
  mfu = metrics.mfu(tokens_per_s, flops, kind, len(jax.devices()))
  memory = train.memory_report(step)
  return {
      "device_kind": kind, "devices": len(jax.devices()), "jax": jax.__version__,
      "layers": cfg.num_layers, "d_model": cfg.d_model, "heads": cfg.num_heads,
      "seq_len": cfg.seq_len, "batch": batch_size, "dtype": cfg.dtype,
      "attention": cfg.attention, "remat": cfg.remat, "fused_qkv": cfg.fused_qkv,
      "scan_layers": cfg.scan_layers, "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "step_s": round(step_s, 5), "step_s_min": round(min(times), 5),
      "tokens_per_s": round(tokens_per_s, 1), "flops_per_token": flops,
      "mfu": None if mfu is None else round(mfu, 4), "compile_s": round(compile_s, 1),
      "per_device_gb": round(memory.get("per_device_bytes", 0) / 2**30, 2), "last_loss": loss,
  }


def run_sweep(args) -> None:
  base = SWEEP_BASE[args.sweep] + args.set
  wanted = args.variants.split(",") if args.variants else [v[0] for v in SWEEPS[args.sweep]]
  unknown = set(wanted) - {v[0] for v in SWEEPS[args.sweep]}
  if unknown:
    raise SystemExit(f"Unknown variants {sorted(unknown)} for sweep {args.sweep!r}.")
  for name, overrides, flags in SWEEPS[args.sweep]:
    if name not in wanted:
      continue
    cmd = [sys.executable, __file__, "--config", args.config, "--warmup", str(args.warmup),
           "--steps", str(args.steps)]
    for item in base + overrides:
      cmd += ["--set", item]
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode or not lines:
      tail = proc.stderr.strip().splitlines() or ["no output"]
      err = next((l for l in reversed(tail) if "Error" in l), tail[-1])[:400]
      print(json.dumps({"variant": name, "error": err}), flush=True)
    else:
      print(json.dumps({"variant": name, **json.loads(lines[-1])}), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/igpt_s.py")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. train.batch_size=64 (repeatable)")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--sweep", choices=sorted(SWEEPS), help="run the named set of variants")
  parser.add_argument("--variants", default="", help="comma-separated subset of the sweep")
  parser.add_argument("--timeout", type=int, default=900, help="seconds per sweep variant")
  args = parser.parse_args()
  if args.sweep:
    run_sweep(args)
    return
  config = load_config(args.config, args.set)
  print(json.dumps(measure(config, args.warmup, args.steps)), flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
