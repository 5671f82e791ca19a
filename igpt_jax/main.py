"""Command line: `python -m igpt_jax.main --config=configs/igpt_l.py [--config.FIELD=VALUE ...]`.

`config.stage` picks the job: fit_palette | pretrain | evaluate | probe | finetune | sample |
plan | all. Every stage writes under --workdir.
"""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from igpt_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the run writes its outputs.")


def plan(config) -> dict:
  """Sizes the configured model without allocating it; the last stdout line is its JSON."""
  from igpt_jax import model as model_lib
  cfg = model_lib.ModelConfig.from_config(config)
  return {
      "params": model_lib.count_params(cfg),
      "flops_per_token": model_lib.flops_per_token(cfg),
      "num_layers": cfg.num_layers,
      "d_model": cfg.d_model,
      "num_heads": cfg.num_heads,
      "seq_len": cfg.seq_len,
      "vocab_size": cfg.vocab_size,
      "objective": cfg.objective,
  }


STAGES = {"plan": plan}


def run(config, workdir):
  stage = config.stage
  if stage not in config_lib.STAGES:
    raise app.UsageError(f"Unknown stage {stage!r}; choose one of {', '.join(config_lib.STAGES)}.")
  if stage not in STAGES:
    raise app.UsageError(f"Stage {stage!r} is not available in this version of igpt_jax yet.")
  result = STAGES[stage](config)
  print(json.dumps(result), flush=True)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
