"""The GPU figures of one lent window, in one command: MFU of iGPT-S/M/L, end-to-end tokens/s on
real images against synthetic batches, cached sampling against the HBM-bandwidth bound, and
measured peak memory against the compiler's (and `plan`'s) figure.

    python benchmarks/gpu_suite.py --out benchmarks/results/gpu_<date>.jsonl   # on the GPU
    python benchmarks/gpu_suite.py --smoke                                      # CPU, tiny sizes

Each part runs in its own process under its own time limit, inside a total budget (`--budget_s`,
default 480): a slow, hung or crashing part is cut off and reported, and the rest still run.
One JSON line per measurement, then one summary line with the targets (S >= 45%, M >= 55%,
L >= 50% MFU; end-to-end >= 97% of synthetic; sampling >= 60% of the bandwidth bound; plan
within 15% of measured). `--smoke` runs every part end to end on the CPU at toy sizes (make test
does), so what reaches a GPU has already run.

The GPU machine has JAX with CUDA but no TensorFlow (nothing here needs it: prepared data and
the Python input pipeline) and possibly not every pure-Python dependency: `preflight` lists
what is missing; `--site DIR` puts a folder of such packages (made beforehand with
`pip install --target DIR --no-deps ml_collections ...`) on the path of every part. The real
images for the end-to-end part are made on the CPU first (`--prepare_images DIR`: scikit-image's
photographs cut into squares, as benchmarks/input.py does) and travel with the working tree.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# The fastest known settings (benchmarks/RESULTS.md, one H100): bf16, cuDNN flash attention,
# matmul outputs saved and the rest recomputed, layers unrolled. L: scan (an unrolled 48-layer
# compile costs minutes of the window) and full remat (its activations at batch 32).
BEST = ["model.dtype=bfloat16", "model.attention=cudnn",
        "model.remat=dots_with_no_batch_dims_saveable", "model.scan_layers=False",
        "train.accum_steps=1", "mesh.data=-1", "mesh.fsdp=1"]
TRAIN_RUNS = {  # part -> (config, overrides, target MFU)
    "mfu_s": ("igpt_s", BEST + ["train.batch_size=128"], 0.45),
    "mfu_m": ("igpt_m", BEST + ["train.batch_size=64"], 0.55),
    "mfu_l": ("igpt_l", BEST + ["train.batch_size=32", "model.scan_layers=True",
                                "model.remat=full"], 0.50),
    "memory_s_b64": ("igpt_s", BEST + ["train.batch_size=64"], None),
    "memory_m_b32": ("igpt_m", BEST + ["train.batch_size=32"], None),
}
SMOKE = ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "data.resolution=8",
         "model.dtype=float32", "model.attention=xla", "palette.k=16", "train.batch_size=8"]
PART_LIMIT_S = {"preflight": 60, "mfu_s": 90, "mfu_m": 110, "mfu_l": 150, "memory_s_b64": 60,
                "memory_m_b32": 80, "input_e2e": 120, "sample_s": 60, "plan_cuda": 90}
MODULES = ("jax", "flax", "optax", "orbax.checkpoint", "ml_collections", "absl", "etils", "numpy",
           "PIL", "einops", "tqdm")


def emit(record: dict) -> None:
  print(json.dumps(record), flush=True)


def train_config(name: str, overrides: list[str], smoke: bool):
  sys.path.insert(0, HERE)
  import train as train_bench  # benchmarks/train.py
  return train_bench.load_config(os.path.join(REPO, "igpt_jax", "configs", f"{name}.py"),
                                 overrides + (SMOKE if smoke else []))


# -- parts: each runs in its own process (`--part NAME`) and prints JSON lines -----------------

def part_preflight(args) -> None:
  import importlib
  versions, missing = {}, []
  for name in MODULES:
    try:
      versions[name] = getattr(importlib.import_module(name), "__version__", "?")
    except ImportError:
      missing.append(name)
  import jax
  emit({"part": "preflight", "device": jax.devices()[0].device_kind,
        "devices": len(jax.devices()), "platform": jax.default_backend(), "versions": versions,
        "missing": missing, "python": sys.version.split()[0]})


def part_train(args) -> None:
  """The real train step on synthetic batches (benchmarks/train.py), plus the measured peak."""
  import jax
  sys.path.insert(0, HERE)
  import train as train_bench
  name, overrides, target = TRAIN_RUNS[args.part]
  config = train_config(name, overrides, args.smoke)
  out = train_bench.measure(config, warmup=2, steps=3 if args.smoke else 6)
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  emit({"part": args.part, "config": name, **out, "target_mfu": target,
        "measured_peak_gb": None if peak is None else round(peak / 2**30, 2)})


def part_input_e2e(args) -> None:
  """iGPT-S pretraining through the real loop on real photographs (a prepared set, the Python
  pipeline: no TensorFlow), tokens/s from its own log, against the same step on synthetic
  batches in the same process."""
  sys.path.insert(0, HERE)
  import train as train_bench

  from igpt_jax.stages import pretrain as pretrain_stage
  if not args.images or not os.path.isdir(args.images):
    raise SystemExit(f"no prepared images at {args.images!r}: make them with --prepare_images")
  steps = 12 if args.smoke else 40
  config = train_config("igpt_s", BEST + ["train.batch_size=128"], args.smoke)
  synthetic = train_bench.measure(config, warmup=2, steps=3 if args.smoke else 6)
  config.data.source, config.data.prepared, config.data.pipeline = (
      "prepared", args.images, "python")
  config.data.augment, config.data.validation_fraction = "none", 0.1
  config.train.steps, config.train.log_every, config.train.warmup_steps = steps, 4 if args.smoke else 10, 2
  config.train.sample_every, config.train.eval_every = 0, 0
  config.checkpoint.every = 10 ** 9
  config.palette.samples, config.palette.iters = 20_000, 3
  with tempfile.TemporaryDirectory() as workdir:
    pretrain_stage.run(config, workdir, log=lambda *_: None)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:  # pretraining's, at the top
      rows = [json.loads(line) for line in f if "tokens_per_s" in line]
  real = statistics.median(r["tokens_per_s"] for r in rows[1:])  # the first holds compilation
  emit({"part": "input_e2e", "real_tokens_per_s": round(real, 1),
        "synthetic_tokens_per_s": synthetic["tokens_per_s"],
        "ratio": round(real / synthetic["tokens_per_s"], 4), "target_ratio": 0.97,
        "log_rows": len(rows), "device": synthetic["device_kind"]})


def part_sample_s(args) -> None:
  """Cached sampling, iGPT-S, batch 64, whole images from the start token, against the time the
  chip needs just to read what each decode step must read: the weights (as stored, float32)
  and the key/value cache up to that position."""
  import jax
  from flax import nnx

  from igpt_jax import model as model_lib
  from igpt_jax import sample, targets
  config = train_config("igpt_s", BEST, args.smoke)
  cfg = model_lib.ModelConfig.from_config(config)
  batch = 4 if args.smoke else 64
  model = model_lib.ImageGPT(cfg, rngs=nnx.Rngs(0))
  jax.block_until_ready(sample.generate(model, batch, jax.random.key(0)))  # compiles
  times = []
  for i in range(1 if args.smoke else 3):
    t0 = time.perf_counter()
    jax.block_until_ready(sample.generate(model, batch, jax.random.key(i + 1)))
    times.append(time.perf_counter() - t0)
  seconds = statistics.median(times)
  tokens_per_s = batch * cfg.seq_len / seconds
  kind = jax.devices()[0].device_kind
  chip = targets.chip_for_device_kind(kind)
  cache_bytes = 2 if cfg.dtype == "bfloat16" else 4
  weights = model_lib.count_params(cfg) * 4
  per_position = 2 * cfg.num_layers * batch * cfg.d_model * cache_bytes  # k and v, one position
  total = cfg.seq_len * weights + per_position * cfg.seq_len * (cfg.seq_len + 1) / 2
  bound = None if chip is None else batch * cfg.seq_len / (total / chip.hbm_bandwidth)
  emit({"part": "sample_s", "device": kind, "batch": batch, "tokens_per_image": cfg.seq_len,
        "seconds": round(seconds, 3), "tokens_per_s": round(tokens_per_s, 1),
        "bytes_read": int(total), "bound_tokens_per_s": None if bound is None else round(bound, 1),
        "fraction_of_bound": None if bound is None else round(tokens_per_s / bound, 4),
        "target_fraction": 0.6})


def part_plan_cuda(args) -> None:
  """`plan`'s per-device figure for the memory parts' settings, from XLA's CUDA compiler
  against a described GPU (no device used) when jax's CUDA plugin is there; else the CPU
  estimate `plan` falls back to. Compared with the measured peaks in the summary."""
  from igpt_jax import plan as plan_lib
  parts = ("mfu_s", "memory_s_b64", "mfu_m", "memory_m_b32")
  for part in parts[:1] if args.smoke else parts:  # smoke: the path once
    name, overrides, _ = TRAIN_RUNS[part]
    config = train_config(name, overrides, args.smoke)
    with config.unlocked():  # smoke: plan's own CPU path, on one device
      config.plan.target = "" if args.smoke else args.gpu_target
      config.plan.num_devices = 1 if args.smoke else 0
      config.plan.search, config.plan.roofline = False, False
    out = plan_lib.run(config, log=lambda *_: None)
    emit({"part": "plan_cuda", "for": part, "target": config.plan.target,
          "compiler": out.get("compiler"), "per_device_gib": out.get("per_device_gib")})


PARTS = {"preflight": part_preflight, **{p: part_train for p in TRAIN_RUNS},
         "input_e2e": part_input_e2e, "sample_s": part_sample_s, "plan_cuda": part_plan_cuda}


# -- the driver --------------------------------------------------------------------------------

def run_part(name: str, args, deadline: float) -> list[dict]:
  limit = min(PART_LIMIT_S[name], deadline - time.monotonic())
  if limit < 10:
    return [{"part": name, "skipped": "the suite's time budget is spent"}]
  cmd = [sys.executable, os.path.abspath(__file__), "--part", name, "--images", args.images,
         "--gpu_target", args.gpu_target] + (["--smoke"] if args.smoke else [])
  site = os.path.abspath(args.site) if args.site else ""
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      filter(None, [site, REPO, os.environ.get("PYTHONPATH", "")]))}
  t0 = time.monotonic()
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit)
  except subprocess.TimeoutExpired:
    return [{"part": name, "error": f"cut off after {limit:.0f} s (its limit)"}]
  records = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
  seconds = round(time.monotonic() - t0, 1)
  if proc.returncode or not records:
    lines = proc.stderr.strip().splitlines() or ["no output"]
    error = next((l for l in reversed(lines) if "Error" in l or "error" in l), lines[-1])
    return [{"part": name, "error": error[:500], "seconds": seconds}]
  return [{**r, "seconds": seconds} for r in records]


def summary(records: list[dict]) -> dict:
  """Each target with its measured value and whether it was met (None: not measured)."""
  by = {r["part"]: r for r in records if "error" not in r and "skipped" not in r
        and r["part"] != "plan_cuda"}
  out = {}
  for part, (_, _, target) in TRAIN_RUNS.items():
    if target is not None:
      mfu = by.get(part, {}).get("mfu")
      out[f"{part}"] = {"value": mfu, "target": target,
                        "met": None if mfu is None else mfu >= target}
  e2e = by.get("input_e2e", {}).get("ratio")
  out["input_e2e"] = {"value": e2e, "target": 0.97, "met": None if e2e is None else e2e >= 0.97}
  frac = by.get("sample_s", {}).get("fraction_of_bound")
  out["sample_s"] = {"value": frac, "target": 0.6, "met": None if frac is None else frac >= 0.6}
  for r in records:
    if r["part"] == "plan_cuda" and "for" in r:
      measured = by.get(r["for"], {}).get("measured_peak_gb")
      planned = r.get("per_device_gib")
      ratio = None if not measured or planned is None else planned / measured
      out[f"plan_vs_{r['for']}"] = {"planned_gib": planned, "measured_gib": measured,
                                    "ratio": None if ratio is None else round(ratio, 3),
                                    "met": None if ratio is None else abs(ratio - 1) <= 0.15}
  failed = [r["part"] for r in records if "error" in r]
  return {"summary": out, "failed_parts": failed,
          "skipped_parts": [r["part"] for r in records if "skipped" in r]}


def prepare_images(directory: str, smoke: bool) -> None:
  sys.path.insert(0, HERE)
  import input as input_bench  # benchmarks/input.py: scikit-image photographs, prepared
  resolution = 8 if smoke else 32
  input_bench.prepared_set(directory, resolution, 256 if smoke else 4096)
  print(f"prepared {directory} ({resolution}x{resolution} input, stored at twice the side)")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
  parser.add_argument("--out", default="", help="also write the JSON lines to this file")
  parser.add_argument("--budget_s", type=float, default=480.0, help="the whole suite's limit")
  parser.add_argument("--parts", default="", help="comma-separated subset of the parts")
  parser.add_argument("--images", default=os.path.join(REPO, "benchmarks", "gpu_images"),
                      help="prepared real images for input_e2e (--prepare_images makes them)")
  parser.add_argument("--prepare_images", default="", metavar="DIR",
                      help="make the prepared images in DIR and exit (run on the CPU first)")
  parser.add_argument("--site", default="", help="a folder of extra pure-Python packages")
  parser.add_argument("--gpu_target", default="h200", help="plan's GPU target for plan_cuda")
  parser.add_argument("--part", default="", help=argparse.SUPPRESS)  # one part, in its process
  args = parser.parse_args(argv)
  if args.prepare_images:
    prepare_images(args.prepare_images, args.smoke)
    return 0
  if args.part:
    PARTS[args.part](args)
    return 0
  wanted = [p for p in PARTS if not args.parts or p in args.parts.split(",")]
  unknown = set(filter(None, args.parts.split(","))) - set(PARTS)
  if unknown:
    print(f"error: unknown parts {sorted(unknown)}; the parts: {', '.join(PARTS)}",
          file=sys.stderr)
    return 2
  deadline = time.monotonic() + args.budget_s
  records = []
  out = open(args.out, "a") if args.out else None
  for name in wanted:
    for record in run_part(name, args, deadline):
      records.append(record)
      emit(record)
      if out:
        out.write(json.dumps(record) + "\n")
        out.flush()
  final = summary(records)
  emit(final)
  if out:
    out.write(json.dumps(final) + "\n")
    out.close()
  return 1 if final["failed_parts"] else 0


if __name__ == "__main__":
  sys.exit(main())
