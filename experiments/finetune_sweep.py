"""Fine-tuning recipes side by side on one pretrained workdir: which defaults beat the probe.

  python experiments/finetune_sweep.py --workdir=runs/demo [--config=demo] [--steps=50]

Every recipe starts from the workdir's pretraining checkpoint (in a copy of the workdir, so
the original is untouched) and is scored on the whole validation split, where the step-0 row of
a probe-initialised head is the last-layer probe's own accuracy. Writes
experiments/finetune_sweep.md and .json (a table per run; nothing is edited by hand).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from igpt_jax import loop  # noqa: E402
from igpt_jax import main as main_lib  # noqa: E402
from igpt_jax.config import load_config_file  # noqa: E402

# (name, overrides of config.finetune)
RECIPES = [
    ("zero head, lr 1e-3 (the release's head)", dict(head_init="zeros", lr=1e-3, head_lr=-1.0)),
    ("probe head, lr 1e-3", dict(head_init="probe", lr=1e-3, head_lr=-1.0)),
    ("probe head, lr 3e-4", dict(head_init="probe", lr=3e-4, head_lr=-1.0)),
    ("probe head, lr 1e-4", dict(head_init="probe", lr=1e-4, head_lr=-1.0)),
    ("probe head, lr 3e-4, L_CLF only", dict(head_init="probe", lr=3e-4, head_lr=-1.0,
                                               gen_weight=0.0)),
    ("probe head, trunk frozen, head lr 1e-3", dict(head_init="probe", lr=0.0, head_lr=1e-3)),
    ("probe head, lr 3e-5, head lr 1e-3", dict(head_init="probe", lr=3e-5, head_lr=1e-3)),
    ("probe head, lr 1e-5, head lr 1e-3", dict(head_init="probe", lr=1e-5, head_lr=1e-3)),
]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a workdir with a pretraining checkpoint")
  parser.add_argument("--config", default="demo")
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "finetune_sweep"))
  parser.add_argument("--only", default="", help="run only the recipes whose names contain this")
  args = parser.parse_args()
  rows = []
  for name, overrides in [r for r in RECIPES if args.only in r[0]]:
    config = load_config_file(os.path.join(main_lib.CONFIGS_DIR, args.config + ".py"))
    config.stage = "finetune"
    config.finetune.steps, config.finetune.eval_every, config.finetune.eval_batches = (
        args.steps, args.steps, 0)
    config.finetune.update(overrides)
    with tempfile.TemporaryDirectory() as tmp:
      workdir = os.path.join(tmp, "run")
      shutil.copytree(args.workdir, workdir,
                      ignore=shutil.ignore_patterns("finetune", "probe", "profile"))
      began = time.perf_counter()
      result = loop.finetune(config, workdir, log=lambda *_: None)
      with open(os.path.join(workdir, "finetune", "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    start = metrics[0] if metrics[0]["step"] == 0 else {}
    row = {"recipe": name, **overrides, "steps": args.steps,
           "step0_val_accuracy": start.get("eval_accuracy"),
           "val_accuracy": result["eval_accuracy"], "test_accuracy": result["test_accuracy"],
           "seconds": round(time.perf_counter() - began)}
    rows.append(row)
    print(json.dumps(row), flush=True)
  fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
  lines = [f"# Fine-tuning recipes on `{args.workdir}` ({args.config}, {args.steps} steps)", "",
           "| recipe | val acc. at step 0 | val acc. | test acc. | s |", "|---|---|---|---|---|"]
  lines += [f"| {r['recipe']} | {fmt(r['step0_val_accuracy'])} | {fmt(r['val_accuracy'])} | "
            f"{fmt(r['test_accuracy'])} | {r['seconds']} |" for r in rows]
  lines += ["", "Validation: the whole held-out split (the step-0 value of a probe head is the "
            "last-layer probe's accuracy); test: the whole test split."]
  with open(args.out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(args.out + ".json", "w") as f:
    json.dump(rows, f, indent=1)
  print("\n".join(lines))


if __name__ == "__main__":
  main()
