"""Linear probes: the paper's f_l = mean_i norm(h_l) for the probed layers, a logistic
regression on each.

One forward pass per split, under the training mesh and sharding rules, extracts every probed
layer's features (and the pixels, for the raw-pixel baseline); each process streams its rows to
<workdir>/probe/features/ in float16 around each chunk's mean (features.py), so no host ever
holds a split; the store is reused only for the same weights, model, palette and data. The
regressions (logreg.py) fit every layer and L2 candidate together: full-batch L-BFGS when the
features fit in `probe.max_memory_mb`, else mini-batch Adam streamed from the store over the
mesh; the L2 strength is chosen on the validation split. The report compares against raw
pixels and the same probe on a randomly initialised model, and adds the concatenation of the
best layers (the paper's multi-layer features; `probe.concat`).
"""

from __future__ import annotations

import dataclasses
import io
import time

import numpy as np

from igpt_jax.config import UserError


def choose_layers(spec: str, num_layers: int) -> list[int]:
  """Probed layers, 1-based. 'all'; 'auto' = all up to 12 layers, else every layer of the
  middle third (where the paper's best layers are) plus a spread of 8 over the rest; or a
  comma-separated list."""
  spec = str(spec).strip()
  if spec == "all" or (spec == "auto" and num_layers <= 12):
    return list(range(1, num_layers + 1))
  if spec == "auto":
    middle = range(num_layers // 3, -(-2 * num_layers // 3) + 1)
    spread = np.linspace(1, num_layers, 8).round().astype(int).tolist()
    return sorted(set(middle) | set(spread))
  try:
    layers = sorted({int(part) for part in spec.split(",") if part.strip()})
  except ValueError:
    layers = []
  if not layers or not all(1 <= l <= num_layers for l in layers):
    raise UserError(f"--config.probe.layers={spec!r}: use 'auto', 'all' or layer numbers "
                    f"1..{num_layers} separated by commas.")
  return layers


def concat_groups(best: int, layers: list[int], count: int) -> list[int]:
  """Indices into `layers` of the `count` probed layers nearest the best one (ties: lower)."""
  near = sorted(range(len(layers)), key=lambda i: (abs(layers[i] - best), layers[i]))
  return sorted(near[:max(1, min(count, len(layers)))])


def masked_features(model, tokens, seed: int, masks: int):
  """[num_layers, B, d] probe features of a BERT model averaged over `masks` inputs masked as in
  pretraining (objectives.mask_ensemble: the same seed gives the same masks). masks=0: the
  unmasked features."""
  from igpt_jax import objectives
  if not masks:
    return model.features(tokens)
  return objectives.mask_ensemble(lambda m: model.features(tokens, m), tokens.shape, seed, masks)


def in_memory_peak_bytes(stores: tuple, groups: int, dim: int) -> int:
  """Host memory the L-BFGS path peaks at: the three splits as float32 [N, G, D], plus, while
  the largest split is loaded, its chunks before concatenation (another copy of it), plus one
  group of every split standardised (a numpy and a device copy on a CPU backend)."""
  sizes = [s.num_examples * groups * dim * 4 for s in stores]
  return sum(sizes) + max(sizes) + 2 * sum(sizes) // max(groups, 1)


def _fit(stores: tuple, num_classes: int, config, mesh, rules, view=None, log=None) -> list[dict]:
  """(train, val, test) stores -> one result per group, in memory or streamed (see module doc)."""
  from igpt_jax import logreg
  p = config.probe
  train, val, test = stores
  groups = train.groups if view is None else len(view)
  dim = train.dim * (1 if view is None else len(view[0]))
  solver = p.solver
  if solver == "auto":
    solver = "lbfgs" if in_memory_peak_bytes(stores, groups, dim) <= p.max_memory_mb * 2**20 \
        else "adam"
  if solver == "lbfgs":
    return logreg.fit_in_memory(*(s.load(view) for s in stores), num_classes, tuple(p.l2),
                                steps=p.steps, predictions=True)
  return logreg.fit_streamed(train, val, test, num_classes, tuple(p.l2), mesh=mesh, rules=rules,
                             batch_size=p.fit_batch_size, epochs=p.epochs, lr=p.lr,
                             seed=config.seed, view=view, log=log)


def low_data(stores: tuple, layers: list[int], num_classes: int, config, log=print) -> list[dict]:
  """The paper's low-data probes: for each probe.labels_per_class value v and each of
  probe.low_data_seeds draws, every layer fitted on v train examples per class (L2 chosen on
  the whole validation split, widened as usual), scored on test. One layer in memory at a time."""
  from igpt_jax import distributed, logreg
  from igpt_jax.config import labels_per_class
  p = config.probe
  train, val, test = stores
  labels = train.labels()
  counts = np.bincount(labels, minlength=num_classes)
  values = labels_per_class(config)
  if counts.min() < max(values):
    v = next(v for v in values if counts.min() < v)
    raise UserError(
        f"--config.probe.labels_per_class={p.labels_per_class!r}: {v} per class needs {v} "
        f"train examples of every class; class {int(counts.argmin())} has {int(counts.min())} "
        f"of the probe's {len(labels)} (raise probe.train_examples or lower the value).")
  draws = {}  # v -> one sorted row set per seed
  for v in values:
    draws[v] = []
    for s in range(p.low_data_seeds):
      rng = np.random.default_rng([config.seed, v, s])
      draws[v].append(np.sort(np.concatenate([
          rng.choice(np.flatnonzero(labels == c), v, replace=False) for c in range(num_classes)])))
  # Each layer's validation, test and drawn train rows are read once, for every value and draw.
  union = np.unique(np.concatenate([rows for per_v in draws.values() for rows in per_v]))
  by_layer = {v: [] for v in values}
  for g, layer in enumerate(layers):
    distributed.PREEMPTION.check("probe")
    evals = (val.load([[g]]), test.load([[g]]))
    xt, yt = train.load([[g]], rows=union)
    for v in values:
      fits = []
      for rows in draws[v]:
        at = np.searchsorted(union, rows)
        fits.append(logreg.fit_in_memory((xt[at], yt[at]), *evals, num_classes, tuple(p.l2),
                                         steps=p.steps)[0])
      acc = np.asarray([f["accuracy"] for f in fits])
      by_layer[v].append({"layer": layer, "mean": float(acc.mean()),
                          "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                          "accuracies": acc.tolist(),
                          "val_mean": float(np.mean([f["val_accuracy"] for f in fits])),
                          "l2": [f["l2"] for f in fits]})
  out = []
  for v in values:
    best = max(by_layer[v], key=lambda r: r["val_mean"])  # chosen on validation, as above
    out.append({"labels_per_class": v, "train_examples": v * num_classes,
                "seeds": p.low_data_seeds, "by_layer": by_layer[v], "best_layer": best["layer"],
                "best_mean": best["mean"], "best_std": best["std"]})
    log(f"low-data probe, {v} labels per class: best layer {best['layer']} "
        f"{best['mean']:.4f} +- {best['std']:.4f} over {p.low_data_seeds} draws")
  return out


# -- report -----------------------------------------------------------------------------------

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
    writer.write(r["layer"], {"probe/accuracy": r["accuracy"],
                              "probe/random_init_accuracy": rand.get(r["layer"]),
                              "probe/raw_pixel_accuracy": results["raw_pixel_accuracy"]})
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
            f"random init (its best layer): {results['random_init_accuracy']:.4f}; raw pixels: "
            f"{results['raw_pixel_accuracy']:.4f}."
            + sample_size_note(results["best_accuracy"], results["test_examples"])]
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


def _subset(data, n: int, seed: int):
  if not n or n >= len(data):
    return data
  idx = np.sort(np.random.default_rng(seed).permutation(len(data))[:n])
  return data.subset(idx, f"{data.name}[{n} examples]")


def sample_size_note(accuracy: float, n: int) -> str:
  """Under ~1,000 test images an accuracy moves by whole percents from image to image: say by
  how much (a 95% binomial interval's half-width), so no one reads a 1.0000 on 26 images."""
  if n >= 1000 or n <= 0:
    return ""
  half = 1.96 * (max(accuracy * (1 - accuracy), 1 / n) / n) ** 0.5
  return (f" On {n} test images an accuracy is uncertain by about +-{half:.3f} (95%): "
          "differences smaller than that are noise.")


def labelled_splits(config, log) -> dict:
  """Probe train, validation (chooses L2) and test sets; without a validation split, 10% of
  the probe's train examples are held out instead."""
  from igpt_jax.data import sources
  p = config.probe
  train = sources.load(config, "train", log=log)
  if sources.validation_fraction(config) > 0:
    val = _subset(sources.load(config, "validation", log=log), p.validation_examples, config.seed)
  else:
    val_idx, train_idx = np.split(np.random.default_rng(config.seed).permutation(len(train)),
                                  [max(1, len(train) // 10)])
    val = train.subset(np.sort(val_idx), f"{train.name}[held out]")
    train = train.subset(np.sort(train_idx), train.name)
  train = _subset(train, p.train_examples, config.seed)
  test = _subset(sources.load(config, "test", log=log), p.test_examples, config.seed)
  train.require_classes("The probe")
  return {"train": train, "validation": val, "test": test}


def run(config, workdir, log=print) -> dict:
  """Stage probe: the probed layers of the pretrained model vs raw pixels and a random-init
  model, plus the concatenation of the best layers. Every process takes part. Its phases:
  select (the model, layers and splits), extract (feature stores), fit, report."""
  began = time.perf_counter()
  target = select(config, workdir, log)
  times = {"load_s": time.perf_counter() - began}
  began = time.perf_counter()
  stores = extract(target, config, log)
  times["extract_s"] = time.perf_counter() - began
  began = time.perf_counter()
  fits = fit_all(target, stores, config, log)
  times["fit_s"] = time.perf_counter() - began
  return report(target, stores, fits, times, config, log)


@dataclasses.dataclass
class Target:
  """What the probe reads: the pretrained model at `step` on its mesh, the layers it probes,
  the labelled splits, and where its features and report go."""
  mesh: object
  rules: object
  cfg: object  # model.ModelConfig
  params: dict
  step: int
  layers: list[int]
  splits: dict  # {"train" | "validation" | "test": sources.ImageSet}
  tokenizer: object
  identity: str  # the weights' values, model and palette: what cached features must match
  palette_hash: str
  out_dir: object
  bert_masks: int


def select(config, workdir, log) -> Target:
  from igpt_jax import checkpoint as checkpoint_lib
  from igpt_jax import sharding as sharding_lib
  from igpt_jax import workdir as workdir_lib
  from igpt_jax.data import transform
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.rules_from_config(config)
  cfg, params, centers, step = workdir_lib.load_pretrained(config, workdir, mesh, rules, log=log)
  layers = choose_layers(config.probe.layers, cfg.num_layers)
  splits = labelled_splits(config, log)
  masks = 0 if cfg.causal else config.probe.bert_masks
  if config.probe.bert_masks and cfg.causal:
    log(f"probe.bert_masks={config.probe.bert_masks} ignored: an AR model's inputs are not "
        "masked.")
  # Cached features are reused only for the same weights (their values, not only their step),
  # model, palette and view of the data.
  return Target(mesh, rules, cfg, params, step, layers, splits,
                transform.Tokenizer(centers, config.data.resolution, mesh, rules),
                f"step{step}:{checkpoint_lib.fingerprint(params)}",
                workdir_lib.palette_digest(centers)[:16], workdir_lib.path(workdir) / "probe",
                masks)


def extract(target: Target, config, log) -> dict:
  """{(model, split): features.Store} for the pretrained model (and the pixels) and a random
  init: reused where a complete store with the same key is there, else extracted."""
  import jax
  from flax import nnx

  from igpt_jax import distributed
  from igpt_jax import features as features_lib
  from igpt_jax import model as model_lib
  from igpt_jax import sharding as sharding_lib
  from igpt_jax import train as train_lib
  from igpt_jax.data import transform
  t, p = target, config.probe
  graphdef = nnx.graphdef(model_lib.abstract_model(t.cfg))
  picked = np.asarray([l - 1 for l in t.layers])
  # [B, probed layers, d]: rows first, as the store keeps them.
  layer_features = jax.jit(lambda prm, tokens: masked_features(
      nnx.merge(graphdef, prm), tokens, config.seed + 2, t.bert_masks)[picked].transpose(1, 0, 2))
  models = {"pretrained": t.params,
            "random_init": train_lib.init_params(t.cfg, t.mesh, t.rules, config.seed + 1)}
  stores = {}
  for tag, prm in models.items():
    names = [tag, "pixels"] if tag == "pretrained" else [tag]
    for split, data in t.splits.items():
      key = {"model": t.identity if tag == "pretrained" else f"init_seed{config.seed + 1}",
             "model_config": dataclasses.asdict(t.cfg), "palette": t.palette_hash,
             "split": split, "examples": len(data), "data": data.name, "layers": t.layers,
             "seed": config.seed, "resolution": config.data.resolution,
             "batch_size": p.batch_size,
             "view": transform.resolve_augment(config.data.augment, data.full_size),
             "mesh": dict(t.mesh.shape), "processes": jax.process_count(),
             "bert_masks": t.bert_masks}
      paths = {n: t.out_dir / "features" / f"{n}-{split}" for n in names}
      done = all(features_lib.Store.complete(paths[n], key) for n in names)
      if not distributed.any_process(not done):
        stores.update({(n, split): features_lib.Store(paths[n]) for n in names})
        log(f"Reusing {tag} features of {len(data)} {split} images in {t.out_dir / 'features'}.")
        continue
      log(f"Extracting {tag} features of layers {t.layers} for {len(data)} {split} images...")

      def forward(tokens, pixels, prm=prm, names=names):
        with sharding_lib.activation_sharding(t.mesh, t.rules):
          out = {names[0]: layer_features(prm, tokens)}
        if "pixels" in names:
          out["pixels"] = pixels.reshape(pixels.shape[0], 1, -1)
        return out

      opened = features_lib.extract(paths, data, forward, t.tokenizer, t.mesh, t.rules,
                                    p.batch_size, key,
                                    min(64 * 2**20, p.max_memory_mb * 2**20 // 4),
                                    config.data.augment, log)
      stores.update({(n, split): opened[n] for n in names})
  return stores


def fit_all(target: Target, stores: dict, config, log) -> dict:
  """Every probed layer of both models, the best layers concatenated, raw pixels and the
  low-data probes. Layers are chosen on validation, like L2: the test split only reports."""
  from igpt_jax import distributed
  layers, k = target.layers, target.splits["train"].num_classes
  of = lambda name: tuple(stores[(name, s)] for s in ("train", "validation", "test"))  # noqa: E731

  def fit(name, view=None):  # whole features are kept: a stop here costs one fit's rerun
    distributed.PREEMPTION.check("probe")
    return _fit(of(name), k, config, target.mesh, target.rules, view, log)

  by_layer = [{"layer": l, **r} for l, r in zip(layers, fit("pretrained"))]
  for r in by_layer:
    log(f"probe layer {r['layer']}: accuracy {r['accuracy']:.4f} (l2={r['l2']:g})"
        + (" -- at the edge of the L2 values tried (probe.l2)" if r["l2_at_edge"] else ""))
  random_by_layer = [{"layer": l, **r} for l, r in zip(layers, fit("random_init"))]
  best = max(by_layer, key=lambda r: r["val_accuracy"])
  group = concat_groups(best["layer"], layers, config.probe.concat)
  return {"by_layer": by_layer, "random_by_layer": random_by_layer, "best": best,
          "best_random": max(random_by_layer, key=lambda r: r["val_accuracy"]),
          "group": group, "multi": fit("pretrained", [group])[0], "raw": fit("pixels")[0],
          "low": (low_data(of("pretrained"), layers, k, config, log)
                  if config.probe.labels_per_class else [])}


def report(target: Target, stores: dict, fits: dict, times: dict, config, log) -> dict:
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
      "seconds": {k: round(v, 1) for k, v in times.items()},
  }
  results = write_report(results, out_dir)
  write_tensorboard(results, out_dir)
  log(f"Probe: best layer {best['layer']} {best['accuracy']:.4f}; random init "
      f"{results['random_init_accuracy']:.4f}; raw pixels {raw['accuracy']:.4f}; concatenated "
      f"layers {results['multi_layer']['layers']} {multi['accuracy']:.4f}. Times: "
      + ", ".join(f"{k} {v:.0f}" for k, v in results["seconds"].items())
      + f".{sample_size_note(best['accuracy'], results['test_examples'])} Report in {out_dir}")
  return {"stage": "probe", "results": str(out_dir / "results.json"),
          **{k: results[k] for k in ("best_layer", "best_accuracy", "random_init_accuracy",
                                     "raw_pixel_accuracy")}}
