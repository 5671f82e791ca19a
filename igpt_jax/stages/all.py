"""Stage all: fit_palette (unless there is one) -> pretrain -> evaluate -> probe -> finetune ->
sample, then a one-screen summary and report.md in the workdir (the demo runs this)."""

from __future__ import annotations

import json
import math
import time

from igpt_jax import goodput
from igpt_jax import probe_report
from igpt_jax import stages
from igpt_jax import train as train_lib
from igpt_jax import workdir as workdir_lib
from igpt_jax.stages import fit_palette

CHAIN = ("pretrain", "evaluate", "probe", "finetune", "sample")


def run(config, workdir, log=print) -> dict:
  """Stage all: fit_palette (unless there is one) -> pretrain -> evaluate -> probe -> finetune
  -> sample, then a one-screen summary and report.md in the workdir."""
  results, start = {}, time.time()
  for stage in ("pretrain", "finetune"):  # a mesh typo, before minutes of k-means
    train_lib.check_fits_devices(config, stage)
  fitted = fit_palette.ensure(config, workdir, log=log)
  if fitted is not None:
    results["fit_palette"] = fitted
  for stage in CHAIN:
    log(f"=== {stage} ===")
    results[stage] = stages.get(stage)(config, workdir, log=log)
  results["minutes"] = (time.time() - start) / 60
  goodput_file = goodput.report_path(workdir)  # written as finetune ended
  results["goodput"] = json.loads(goodput_file.read_text()) if goodput_file.exists() else None
  report = summary(results, workdir)
  report_path = workdir_lib.path(workdir) / "report.md"
  workdir_lib.write_text(report_path, report)
  log(report)
  return {"stage": "all", "report": str(report_path),
          "test_bits_per_dim": results["evaluate"]["test_bits_per_dim"],
          "best_layer": results["probe"]["best_layer"],
          "best_accuracy": results["probe"]["best_accuracy"],
          "random_init_accuracy": results["probe"]["random_init_accuracy"],
          "raw_pixel_accuracy": results["probe"]["raw_pixel_accuracy"],
          "finetune_accuracy": results["finetune"].get("test_accuracy"),
          "goodput": (results["goodput"] or {}).get("goodput"), "minutes": results["minutes"]}


def summary(results: dict, workdir: str) -> str:
  p, e, f, s = results["probe"], results["evaluate"], results["finetune"], results["sample"]
  probe_dir = workdir_lib.path(workdir) / "probe"
  lines = [
      "# igpt_jax run report", "",
      f"Workdir: `{workdir}` ({results['minutes']:.1f} minutes)", "",
      f"- Test bits/dim: **{e['test_bits_per_dim']:.4f}** ({e['test_loss']:.4f} nats/token)"
      + (f"; validation {e['validation_bits_per_dim']:.4f}" if "validation_bits_per_dim" in e else ""),
      f"- Linear probe, best layer {p['best_layer']}: **{p['best_accuracy']:.4f}** "
      f"(random-init model {probe_report.accuracy_text(p['random_init_accuracy'])}, raw pixels "
      f"{probe_report.accuracy_text(p['raw_pixel_accuracy'])});"
      f" by layer: `{probe_dir / 'results.md'}`, plot `{probe_dir / 'accuracy_by_layer.png'}`",
      f"- Fine-tuned test accuracy: **{f.get('test_accuracy', float('nan')):.4f}** (validation "
      f"{f.get('eval_accuracy', float('nan')):.4f})",
      f"- Samples: `{s['unconditional']}`; completions: `{s['completions']}`",
      *([f"- Time: {goodput.text(results['goodput'])} (`{goodput.report_path(workdir)}`)"]
        if results.get("goodput") else []),
      "", "Against the paper's findings (ImageNet, models 1,000x larger, 1M steps):", "",
  ]
  ft = f.get("test_accuracy", float("nan"))
  probe_results = json.loads(workdir_lib.path(p["results"]).read_text())
  n_probe = probe_results["test_examples"]
  n_ft = f.get("test_examples", 0)
  checks = [
      ((p["best_accuracy"], n_probe), (p["random_init_accuracy"], n_probe),
       "pretrained features beat a random-init model", "pretraining this short has not yet "
       "taught the model more than its random projection of the pixels gives"),
      ((p["best_accuracy"], n_probe), (p["raw_pixel_accuracy"], n_probe),
       "pretrained features beat raw pixels (the paper's features beat pixels by far)",
       f"a linear model on these raw pixels is already at {p['raw_pixel_accuracy'] or 0:.2f}; "
       "features of a briefly trained small model are not there yet"),
      ((ft, n_ft), (p["best_accuracy"], n_probe), "fine-tuning beats the best linear probe",
       _why_finetune(f, p, probe_results["by_layer"])),
  ]
  for (a, n_a), (b, n_b), claim, why in checks:
    if a is None or b is None:  # a baseline left out (probe.baselines)
      continue
    # Two binomial standard errors of the difference: what the test images can tell apart.
    se = math.sqrt(a * (1 - a) / max(n_a, 1) + b * (1 - b) / max(n_b, 1))
    if a - b > 2 * se:
      lines.append(f"- Holds: {claim} ({a:.4f} vs {b:.4f}).")
    elif b - a > 2 * se:
      lines.append(f"- Does not hold here: {claim} ({a:.4f} vs {b:.4f}). Why at this scale: "
                   f"{why}.")
    else:
      lines.append(f"- Not resolved at this size: {claim} ({a:.4f} vs {b:.4f}, a difference of "
                   f"{a - b:+.4f} within twice its standard error {se:.4f} on {n_a:,} and "
                   f"{n_b:,} test images; experiments/fmnist.py measures it with intervals).")
  return "\n".join(lines) + "\n"


def _why_finetune(f: dict, p: dict, by_layer: list[dict]) -> str:
  """Why fine-tuning fell short of the best probe, from what this run measured (`by_layer`:
  the probe's results.json rows)."""
  start = f.get("head_probe", {}).get("start_eval_accuracy")
  end, n_val = f.get("eval_accuracy", float("nan")), f.get("eval_examples", 0)
  last = by_layer[-1] if by_layer else None
  if start is None:
    return ("the class head started at zero (finetune.head_init=zeros) and these few steps "
            "are too short to train it; the default head_init=probe starts from the last "
            "layer's probe")
  moved = (f"fine-tuning moved the head's validation accuracy from {start:.4f} (the last "
           f"layer's probe) to {end:.4f} ({round((end - start) * n_val):+d} of {n_val:,} images)")
  if last is not None and last["layer"] != p["best_layer"]:
    return (f"{moved}, and it reads the last layer, while the best probe is layer "
            f"{p['best_layer']} ({p['best_accuracy']:.4f} vs the last layer's "
            f"{last['accuracy']:.4f} on test): a middle layer's features beat the last layer's, "
            "as in the paper, and a short fine-tune does not close that gap")
  return f"{moved}; a short fine-tune with the trunk at finetune.lr changes little"
