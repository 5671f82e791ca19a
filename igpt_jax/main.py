"""Command line: `python -m igpt_jax.main --config=configs/igpt_l.py [--config.FIELD=VALUE ...]`.

`config.stage` picks the job: fit_palette | pretrain | evaluate | probe | finetune | sample |
plan | all. Every stage writes under --workdir (default: a timestamped folder under ./runs/)
and prints one JSON object as its last stdout line.
"""

import datetime
import json
import os

from absl import app, flags
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
  """k-means palette on a pixel sample of the pretraining split -> <workdir>/palette.npz."""
  from igpt_jax import palette as palette_lib
  from igpt_jax.data import sources
  data = sources.load(config, "pretrain", log=log)
  log(f"Fitting a {config.palette.k}-colour palette on {config.palette.samples} pixels of "
      f"{data.name} ({len(data)} images).")
  pixels = palette_lib.sample_pixels(data.images, config.palette.samples, seed=config.seed)
  centers = palette_lib.fit(pixels, config.palette.k, seed=config.seed,
                            iters=config.palette.iters, log=log)
  path = os.path.join(workdir, palette_lib.PALETTE_FILE)
  palette_lib.Palette(centers, dataset=data.name, seed=config.seed).save(path)
  log(f"Palette written to {path}")
  return {"stage": "fit_palette", "palette": path, "k": config.palette.k,
          "channels": int(centers.shape[1])}


def plan(config, workdir: str) -> dict:
  """Sizes the configured model without allocating it."""
  from igpt_jax import model as model_lib
  cfg = model_lib.ModelConfig.from_config(config)
  return {
      "stage": "plan",
      "params": model_lib.count_params(cfg),
      "flops_per_token": model_lib.flops_per_token(cfg),
      "num_layers": cfg.num_layers,
      "d_model": cfg.d_model,
      "num_heads": cfg.num_heads,
      "seq_len": cfg.seq_len,
      "vocab_size": cfg.vocab_size,
      "objective": cfg.objective,
  }


STAGES = {"fit_palette": fit_palette, "plan": plan}


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
  print(json.dumps(result), flush=True)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
  run(_CONFIG.value,
      _WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"])))


if __name__ == "__main__":
  app.run(main)
