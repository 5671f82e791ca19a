"""Stage all: fit_palette (unless there is one) -> pretrain -> evaluate -> probe -> finetune ->
sample, then a one-screen summary and report.md in the workdir (the demo runs this)."""

from __future__ import annotations

import json
import time

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
  report = summary(results, workdir)
  report_path = workdir_lib.path(workdir) / "report.md"
  workdir_lib.write_text(report_path, report)
  log(report)
  return {"stage": "all", "report": str(report_path),
          "eval_bits_per_dim": results["evaluate"]["eval_bits_per_dim"],
          "best_layer": results["probe"]["best_layer"],
          "best_accuracy": results["probe"]["best_accuracy"],
          "random_init_accuracy": results["probe"]["random_init_accuracy"],
          "raw_pixel_accuracy": results["probe"]["raw_pixel_accuracy"],
          "finetune_accuracy": results["finetune"].get("test_accuracy"),
          "minutes": results["minutes"]}


def summary(results: dict, workdir: str) -> str:
  p, e, f, s = results["probe"], results["evaluate"], results["finetune"], results["sample"]
  probe_dir = workdir_lib.path(workdir) / "probe"
  lines = [
      "# igpt_jax run report", "",
      f"Workdir: `{workdir}` ({results['minutes']:.1f} minutes)", "",
      f"- Test bits/dim: **{e['test_bits_per_dim']:.4f}** ({e['test_loss']:.4f} nats/token)"
      + (f"; validation {e['validation_bits_per_dim']:.4f}" if "validation_bits_per_dim" in e else ""),
      f"- Linear probe, best layer {p['best_layer']}: **{p['best_accuracy']:.4f}** "
      f"(random-init model {p['random_init_accuracy']:.4f}, raw pixels {p['raw_pixel_accuracy']:.4f});"
      f" by layer: `{probe_dir / 'results.md'}`, plot `{probe_dir / 'accuracy_by_layer.png'}`",
      f"- Fine-tuned test accuracy: **{f.get('test_accuracy', float('nan')):.4f}** (validation "
      f"{f.get('eval_accuracy', float('nan')):.4f})",
      f"- Samples: `{s['unconditional']}`; completions: `{s['completions']}`",
      "", "Against the paper's findings (ImageNet, models 1,000x larger, 1M steps):", "",
  ]
  ft = f.get("test_accuracy", float("nan"))
  checks = [
      (p["best_accuracy"] > p["random_init_accuracy"], "pretrained features beat a random-init "
       "model", "pretraining this short has not yet taught the model more than its random "
       "projection of the pixels gives"),
      (p["best_accuracy"] > p["raw_pixel_accuracy"], "pretrained features beat raw pixels "
       "(the paper's features beat pixels by far)", f"a linear model on these raw pixels is "
       f"already at {p['raw_pixel_accuracy']:.2f}; features of a briefly trained small model are not there yet"),
      (ft > p["best_accuracy"], "fine-tuning beats the best linear probe", _why_finetune(f, p)),
  ]
  for held, claim, why in checks:
    lines.append(f"- {'Holds' if held else 'Does not hold here'}: {claim}."
                 + ("" if held else f" Why at this scale: {why}."))
  return "\n".join(lines) + "\n"


def _why_finetune(f: dict, p: dict) -> str:
  """Why fine-tuning did not beat the best probe, from what this run measured."""
  start = f.get("head_probe", {}).get("start_eval_accuracy")
  by_layer = json.loads(workdir_lib.path(p["results"]).read_text())["by_layer"]
  last = by_layer[-1] if by_layer else None
  if start is None:
    return ("the class head started at zero (finetune.head_init=zeros) and these few steps "
            "are too short to train it; the default head_init=probe starts from the last "
            "layer's probe")
  if f.get("eval_accuracy", 0.0) < start:
    return (f"the head started as the last layer's probe ({start:.4f} on validation) and "
            f"fine-tuning lowered it to {f.get('eval_accuracy', float('nan')):.4f}: lower "
            "finetune.lr")
  if last is not None and last["layer"] != p["best_layer"]:
    return (f"fine-tuning reads the last layer, which it improved ({start:.4f} -> "
            f"{f.get('eval_accuracy', float('nan')):.4f} on validation), but the best probe "
            f"is layer {p['best_layer']}: a middle layer's features beat the last layer's, as "
            "in the paper, and fine-tuning this short does not close that gap")
  return (f"fine-tuning improved the last layer's probe ({start:.4f} -> "
          f"{f.get('eval_accuracy', float('nan')):.4f} on validation) but not past the best "
          "probe on test")
