"""igpt_jax: Image GPT pretraining, probes, fine-tuning and sampling.

  python -m igpt_jax.main --config=configs/demo.py --config.stage=STAGE [--workdir=DIR]
                          [--config.FIELD=VALUE ...]

Stages (--config.stage): fit_palette, pretrain, evaluate, probe, finetune, sample, plan, all.
Every stage writes under --workdir (default: runs/<config>-<timestamp>), says where its
outputs went, and prints one JSON object as its last stdout line.

Most used overrides:
  --config.train.steps=N           --config.train.batch_size=N     --config.train.lr=X
  --config.model.num_layers=N      --config.model.d_model=N        --config.model.dtype=bfloat16
  --config.model.attention=cudnn   --config.model.remat=full       --config.model.objective=bert
  --config.data.source=folder      --config.data.path=DIR          --config.data.name=cifar10
  --config.mesh.fsdp=-1            --config.plan.num_devices=256   --config.checkpoint.every=N
A misspelt field stops at once, naming the closest valid one.
"""

import datetime
import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from igpt_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the run writes its outputs "
                               "(default: runs/<config>-<timestamp>).")


def log(msg: str) -> None:
  print(msg, flush=True)


def palette_path(config, workdir: str) -> str:
  from igpt_jax import palette as palette_lib
  return config.palette.path or os.path.join(workdir, palette_lib.PALETTE_FILE)


def fit_palette(config, workdir: str) -> dict:
  from igpt_jax import palette as palette_lib
  return palette_lib.fit_stage(config, workdir, log=log)


def plan(config, workdir: str) -> dict:
  """Sizes the model and compiles its train step for the configured mesh, allocating nothing.

  With plan.num_devices > 0 the mesh is made of that many simulated CPU devices (set before JAX
  starts, see main), so a laptop can plan a pod.
  """
  import jax

  from igpt_jax import model as model_lib
  from igpt_jax import sharding as sharding_lib
  from igpt_jax import train as train_lib
  cfg = model_lib.ModelConfig.from_config(config)
  out = {
      "stage": "plan",
      "params": model_lib.count_params(cfg),
      "flops_per_token": model_lib.flops_per_token(cfg),
      "num_layers": cfg.num_layers,
      "d_model": cfg.d_model,
      "num_heads": cfg.num_heads,
      "seq_len": cfg.seq_len,
      "vocab_size": cfg.vocab_size,
      "objective": cfg.objective,
      "batch_size": config.train.batch_size,
  }
  devices = jax.devices()
  if config.plan.num_devices:
    devices = devices[:config.plan.num_devices]
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  trainer = train_lib.Trainer(cfg, config, mesh, sharding_lib.rules_from_config(config))
  log(f"Compiling the train step for mesh {dict(mesh.shape)} ({len(devices)} devices)...")
  out["mesh"] = dict(mesh.shape)
  out.update(train_lib.memory_report(trainer.compile_step()))
  if config.plan.device_memory_gb and "per_device_bytes" in out:
    out["device_memory_gb"] = config.plan.device_memory_gb
    out["fits"] = out["per_device_bytes"] <= config.plan.device_memory_gb * 2**30
  return out


def pretrain(config, workdir: str) -> dict:
  from igpt_jax import train as train_lib
  return train_lib.pretrain(config, workdir, log=log)


def evaluate(config, workdir: str) -> dict:
  from igpt_jax import train as train_lib
  return train_lib.evaluate_stage(config, workdir, log=log)


def probe(config, workdir: str) -> dict:
  from igpt_jax import probe as probe_lib
  return probe_lib.run(config, workdir, log=log)


def finetune(config, workdir: str) -> dict:
  from igpt_jax import train as train_lib
  return train_lib.finetune(config, workdir, log=log)


def sample(config, workdir: str) -> dict:
  from igpt_jax import sample as sample_lib
  return sample_lib.run(config, workdir, log=log)


CHAIN = ("pretrain", "evaluate", "probe", "finetune", "sample")


def run_all(config, workdir: str) -> dict:
  """Stage all: fit_palette (unless there is one) -> pretrain -> evaluate -> probe -> finetune
  -> sample, then a one-screen summary and report.md in the workdir."""
  import time
  from igpt_jax import palette as palette_lib
  results, start = {}, time.time()
  if not os.path.exists(config.palette.path or os.path.join(workdir, palette_lib.PALETTE_FILE)):
    results["fit_palette"] = fit_palette(config, workdir)
  for stage in CHAIN:
    log(f"=== {stage} ===")
    results[stage] = STAGES[stage](config, workdir)
  results["minutes"] = (time.time() - start) / 60
  report = summary(results, workdir)
  with open(os.path.join(workdir, "report.md"), "w", encoding="utf-8") as f:
    f.write(report)
  log(report)
  return {"stage": "all", "report": os.path.join(workdir, "report.md"),
          "eval_bits_per_dim": results["evaluate"]["eval_bits_per_dim"],
          "best_layer": results["probe"]["best_layer"],
          "best_accuracy": results["probe"]["best_accuracy"],
          "random_init_accuracy": results["probe"]["random_init_accuracy"],
          "raw_pixel_accuracy": results["probe"]["raw_pixel_accuracy"],
          "finetune_accuracy": results["finetune"].get("eval_accuracy"),
          "minutes": results["minutes"]}


def summary(results: dict, workdir: str) -> str:
  p, e, f, s = results["probe"], results["evaluate"], results["finetune"], results["sample"]
  lines = [
      "# igpt_jax run report", "",
      f"Workdir: `{workdir}` ({results['minutes']:.1f} minutes)", "",
      f"- Test bits/dim: **{e['eval_bits_per_dim']:.4f}** ({e['eval_loss']:.4f} nats/token)",
      f"- Linear probe, best layer {p['best_layer']}: **{p['best_accuracy']:.4f}** "
      f"(random-init model {p['random_init_accuracy']:.4f}, raw pixels {p['raw_pixel_accuracy']:.4f});"
      f" by layer: `{os.path.join(workdir, 'probe', 'results.md')}`, plot "
      f"`{os.path.join(workdir, 'probe', 'accuracy_by_layer.png')}`",
      f"- Fine-tuned test accuracy: **{f.get('eval_accuracy', float('nan')):.4f}**",
      f"- Samples: `{s['unconditional']}`; completions: `{s['completions']}`",
  ]
  return "\n".join(lines) + "\n"


STAGES = {"fit_palette": fit_palette, "pretrain": pretrain, "evaluate": evaluate, "probe": probe,
          "finetune": finetune, "sample": sample, "plan": plan, "all": run_all}


def simulate_cpu_devices(n: int) -> None:
  """Must run before JAX starts its backend: the plan stage then sees n CPU devices."""
  flags_now = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = (flags_now + f" --xla_force_host_platform_device_count={n}").strip()
  os.environ["JAX_PLATFORMS"] = "cpu"


def default_workdir(config_path: str) -> str:
  name = os.path.splitext(os.path.basename(config_path or "run"))[0]
  return os.path.join("runs", f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}")


def run(config, workdir: str) -> dict:
  stage = config.stage
  if stage not in config_lib.STAGES:
    raise app.UsageError(f"Unknown stage {stage!r}; choose one of {', '.join(config_lib.STAGES)}.")
  if stage not in STAGES:
    raise app.UsageError(f"Stage {stage!r} is not available in this version of igpt_jax yet.")
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))
  result = STAGES[stage](config, workdir)
  log(f"{stage} done; outputs in {os.path.abspath(workdir)}")
  print(json.dumps(result), flush=True)
  return result


def check_overrides(argv: list[str]) -> None:
  """Fails on a `--config.a.b=...` whose key the config lacks, naming the closest valid key.

  ml_collections would also refuse it, but with a traceback from inside flag parsing; this runs
  first and says it in one line.
  """
  import difflib

  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if path is None and "--config" in argv[:-1]:
    path = argv[argv.index("--config") + 1]
  overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
  if not path or not overrides or not os.path.isfile(path.split(":")[0]):
    return
  keys = _flat_keys(config_lib.load_config_file(path.split(":")[0]))
  for key in overrides:
    if key not in keys:
      close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
      hint = f" Did you mean --config.{close[0]}?" if close else ""
      raise SystemExit(f"error: --config.{key} is not a field of {path}.{hint}")


def _flat_keys(config, prefix: str = "") -> list[str]:
  keys = []
  for name, value in config.items():
    keys.append(prefix + name)
    if hasattr(value, "items"):
      keys += _flat_keys(value, prefix + name + ".")
  return keys


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # library chatter (Orbax saves) off; our lines stay
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
  if _CONFIG.value.stage == "plan" and _CONFIG.value.plan.num_devices:
    simulate_cpu_devices(_CONFIG.value.plan.num_devices)
  run(_CONFIG.value,
      _WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"])))


if __name__ == "__main__":
  import sys
  if any(a in ("-h", "--help", "-?") for a in sys.argv[1:]):  # absl would exit 1 on --help
    app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
  check_overrides(sys.argv[1:])
  app.run(main)
