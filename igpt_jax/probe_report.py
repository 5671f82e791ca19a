"""The linear probe's report: results.json and results.md, the accuracy-by-layer plot,
TensorBoard, and the stage's summary line (probe.py fits what they show)."""

from __future__ import annotations

import io

import numpy as np


def report(target, stores: dict, fits: dict, times: dict, config, log) -> dict:
  """results.json/.md, the per-example test predictions, TensorBoard, a summary line; -> the
  stage's JSON line."""
  from igpt_jax import distributed
  from igpt_jax import workdir as workdir_lib
  layers, out_dir, splits = target.layers, target.out_dir, target.splits
  best, multi, raw = fits["best"], fits["multi"], fits["raw"]
  predictions = {}  # from the in-memory solver only
  for name, r in ([(f"layer{r['layer']}", r) for r in fits["by_layer"]]
                  + [(f"random_init_layer{r['layer']}", r) for r in fits["random_by_layer"]]
                  + [("concat", multi), ("raw_pixels", raw)]):
    if "predictions" in r:
      predictions[name] = r.pop("predictions")
  if predictions and distributed.is_chief():  # per-example test predictions: paired tests
    buffer = io.BytesIO()
    np.savez(buffer, labels=stores[("pretrained", "test")].labels(), **predictions)
    workdir_lib.write_bytes(out_dir / "test_predictions.npz", buffer.getvalue())
  results = {
      "checkpoint_step": target.step, "train_examples": len(splits["train"]),
      "validation_examples": len(splits["validation"]), "test_examples": len(splits["test"]),
      "layers": layers, "by_layer": fits["by_layer"], "best_layer": best["layer"],
      "best_accuracy": best["accuracy"],
      "multi_layer": {"layers": [layers[i] for i in fits["group"]], **multi},
      "random_init_by_layer": fits["random_by_layer"],
      "random_init_accuracy": fits["best_random"]["accuracy"],
      "raw_pixel_accuracy": raw["accuracy"], "bert_masks": target.bert_masks,
      **({"low_data": fits["low"]} if fits["low"] else {}),
      **({"selection": fits["selection"]} if fits.get("selection") else {}),
      "seconds": {k: round(v, 1) for k, v in times.items()},
  }
  results = write_report(results, out_dir)
  write_tensorboard(results, out_dir)
  log(f"Probe: best layer {best['layer']} {best['accuracy']:.4f}; random init "
      f"{accuracy_text(results['random_init_accuracy'])}; raw pixels "
      f"{accuracy_text(raw['accuracy'])}; concatenated "
      f"layers {results['multi_layer']['layers']} {multi['accuracy']:.4f}. Times: "
      + ", ".join(f"{k} {v:.0f}" for k, v in results["seconds"].items())
      + f".{sample_size_note(best['accuracy'], results['test_examples'])} Report in {out_dir}")
  return {"stage": "probe", "results": str(out_dir / "results.json"),
          **{k: results[k] for k in ("best_layer", "best_accuracy", "random_init_accuracy",
                                     "raw_pixel_accuracy")}}


def write_tensorboard(results: dict, out_dir) -> None:
  """Accuracy by layer as TensorBoard scalars (step = layer) and the plot as an image."""
  import io

  from PIL import Image

  from igpt_jax import distributed
  from igpt_jax import metrics as metrics_lib
  if not distributed.is_chief():
    return
  writer = metrics_lib.MetricsWriter(out_dir, namespace="probe")
  writer.truncate_after(0)
  rand = {r["layer"]: r["accuracy"] for r in results.get("random_init_by_layer", [])}
  for r in results["by_layer"]:
    scalars = {"probe/accuracy": r["accuracy"],
               "probe/random_init_accuracy": rand.get(r["layer"]),
               "probe/raw_pixel_accuracy": results["raw_pixel_accuracy"]}
    writer.write(r["layer"], {k: v for k, v in scalars.items() if v is not None})
  from etils import epath
  plot = epath.Path(results["plot"]).read_bytes()
  writer.write_image(results["checkpoint_step"], "probe/accuracy_by_layer",
                     np.asarray(Image.open(io.BytesIO(plot)).convert("RGB")))
  writer.close()


def write_report(results: dict, out_dir) -> dict:
  """results.json, results.md and accuracy_by_layer.png in out_dir (process 0 writes)."""
  import io

  from igpt_jax import distributed
  from igpt_jax import workdir as workdir_lib
  out_dir = workdir_lib.path(out_dir)
  plot_path = out_dir / "accuracy_by_layer.png"
  results["plot"] = str(plot_path)
  if not distributed.is_chief():
    return results
  workdir_lib.write_json(out_dir / "results.json", results)
  lines = ["| layer | accuracy | random init |", "|---|---|---|"]
  rand = {r["layer"]: r["accuracy"] for r in results.get("random_init_by_layer", [])}
  for r in results["by_layer"]:
    lines.append(f"| {r['layer']} | {r['accuracy']:.4f} | {rand.get(r['layer'], float('nan')):.4f} |")
  for low in results.get("low_data", []):
    lines += ["", f"Low-data probe, {low['labels_per_class']} labels per class "
              f"({low['train_examples']} train examples, {low['seeds']} draws): mean +- std of "
              "test accuracy.", "", "| layer | accuracy |", "|---|---|"]
    lines += [f"| {r['layer']} | {r['mean']:.4f} +- {r['std']:.4f} |" for r in low["by_layer"]]
  lines += ["", f"Test accuracy; layers and L2 chosen on validation. Best layer "
            f"{results['best_layer']}: {results['best_accuracy']:.4f}; concatenated layers "
            f"{results['multi_layer']['layers']}: {results['multi_layer']['accuracy']:.4f}; "
            f"random init (its best layer): {accuracy_text(results['random_init_accuracy'])}; "
            f"raw pixels: {accuracy_text(results['raw_pixel_accuracy'])}."
            + sample_size_note(results["best_accuracy"], results["test_examples"])]
  if "selection" in results:
    sel = results["selection"]
    lines += ["", f"Layers chosen on {sel['examples']} train and {sel['validation_examples']} "
              f"validation examples (probe.select_examples): validation accuracy by layer.", "",
              "| layer | validation accuracy |", "|---|---|"]
    lines += [f"| {r['layer']} | {r['val_accuracy']:.4f} |" for r in sel["by_layer"]]
  if "seconds" in results:
    lines += ["", "Seconds: " + ", ".join(f"{k} {v}" for k, v in results["seconds"].items()) + "."]
  workdir_lib.write_text(out_dir / "results.md", "\n".join(lines) + "\n")
  png = io.BytesIO()
  accuracy_plot(results, rand).savefig(png, format="png", dpi=100)
  workdir_lib.write_bytes(plot_path, png.getvalue())
  return results


def accuracy_plot(results: dict, rand: dict):
  """Accuracy by layer (pretrained, random init, raw pixels, low-data probes), a Figure."""
  from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone
  from matplotlib.ticker import MaxNLocator
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  layers = [r["layer"] for r in results["by_layer"]]
  ax.plot(layers, [r["accuracy"] for r in results["by_layer"]], "o-", label="pretrained")
  if rand:
    ax.plot(layers, [rand[l] for l in layers], "s--", label="random init")
  if results["raw_pixel_accuracy"] is not None:
    ax.axhline(results["raw_pixel_accuracy"], color="gray", linestyle=":", label="raw pixels")
  for low in results.get("low_data", []):
    ax.errorbar(layers, [r["mean"] for r in low["by_layer"]],
                yerr=[r["std"] for r in low["by_layer"]], fmt=".-", capsize=2,
                label=f"{low['labels_per_class']} labels/class")
  ax.set_xlabel("layer")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
  ax.set_ylabel("linear probe accuracy")
  ax.legend()
  fig.tight_layout()
  return fig


def accuracy_text(accuracy) -> str:
  """An accuracy for the report; a baseline probe.baselines left out says so."""
  return "not run (probe.baselines)" if accuracy is None else f"{accuracy:.4f}"


def sample_size_note(accuracy: float, n: int) -> str:
  """Under ~1,000 test images an accuracy moves by whole percents from image to image: say by
  how much (a 95% binomial interval's half-width), so no one reads a 1.0000 on 26 images."""
  if n >= 1000 or n <= 0:
    return ""
  half = 1.96 * (max(accuracy * (1 - accuracy), 1 / n) / n) ** 0.5
  return (f" On {n} test images an accuracy is uncertain by about +-{half:.3f} (95%): "
          "differences smaller than that are noise.")
