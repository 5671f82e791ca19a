"""A Fashion-MNIST study of the paper's findings, with intervals that say what it can tell.

    .venv/bin/python experiments/fmnist.py --workdir=runs/fmnist

Pretrains an 8-layer, d=64 iGPT on 10x10 gray images (16-level palette) for one epoch with
L_AR (two seeds) and L_BERT (one seed); probes every layer at three checkpoints of each run on
10k train / 5k validation / the whole 10k test split; probes BERT unmasked and with mask
ensembling; fits three pixel baselines (raw pixels, the quantized pixels the model reads, a
pooled colour histogram) and low-data probes; fine-tunes the AR model from its probe (LP-FT);
and writes experiments/RESULTS.md, every number, verdict and caveat computed here: accuracies
with 95% bootstrap intervals over the test images, differences paired on the same images, and
a finding "holds" only when its interval excludes zero. Every stage is cached in the workdir,
so a rerun resumes. `--quick` runs the whole script at toy sizes in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

RUNS = (("ar", 0), ("ar", 1), ("bert", 0))
TRAIN_IMAGES = 54_000  # Fashion-MNIST's train split less the 10% validation hold-out
BERT_MASKS = 4
LOW_DATA = "10,100"
LOW_DATA_SEEDS = 5
Z95 = 1.96


def quiet(*_):
  pass


# -- configuration ----------------------------------------------------------------------------

def sizes(args) -> dict:
  if args.quick:
    return dict(resolution=6, layers=2, width=32, steps=30, probe_train=1_000, probe_val=500,
                probe_test=0, finetune_steps=10, low_data="5,20", low_data_seeds=2)
  steps = 3 * max(1, round(args.epochs * TRAIN_IMAGES / 64 / 3))  # three equal thirds
  return dict(resolution=10, layers=8, width=64, steps=steps, probe_train=10_000,
              probe_val=5_000, probe_test=0, finetune_steps=args.finetune_steps,
              low_data=LOW_DATA, low_data_seeds=LOW_DATA_SEEDS)


def make_config(objective: str, seed: int, args):
  from igpt_jax.config import load_config_file
  z = sizes(args)
  c = load_config_file(os.path.join(os.path.dirname(HERE), "configs", "demo.py"))
  c.seed = seed
  c.data.resolution, c.palette.k = z["resolution"], 16
  c.model.num_layers, c.model.d_model, c.model.num_heads = z["layers"], z["width"], 4
  c.model.objective = objective
  c.train.steps, c.train.batch_size = z["steps"], 64
  c.train.lr, c.train.warmup_steps = 3e-3, max(1, z["steps"] // 20)
  c.train.log_every, c.train.sample_every, c.train.eval_every = 50, 0, 0
  c.checkpoint.every, c.checkpoint.keep = z["steps"] // 3, 3  # the three probed checkpoints
  c.palette.path = os.path.join(args.workdir, "palette.npz")  # one palette for every run
  c.probe.train_examples, c.probe.validation_examples = z["probe_train"], z["probe_val"]
  c.probe.test_examples, c.probe.layers = z["probe_test"], "all"
  c.finetune.steps, c.finetune.warmup_steps = z["finetune_steps"], max(1, z["finetune_steps"] // 10)
  c.finetune.eval_every, c.finetune.eval_batches = 0, 0
  return c


def checkpoint_steps(config) -> list[int]:
  third = config.train.steps // 3
  return [third, 2 * third, config.train.steps]


# -- cached stages ----------------------------------------------------------------------------

def cached(path: str, compute):
  """compute() -> JSON-able dict, written to `path` once; a rerun reads it back."""
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  out = compute()
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(out, f, indent=1)
  os.replace(tmp, path)
  return out


def log_stage(name: str, minutes: dict, fn, *args):
  """Runs one stage, adding its minutes to `minutes` (kept in the workdir across reruns)."""
  print(f"=== {name} ===", flush=True)
  start = time.time()
  out = fn(*args)
  minutes[name] = minutes.get(name, 0.0) + (time.time() - start) / 60
  with open(minutes["_path"], "w") as f:
    json.dump(minutes, f)
  return out


def test_bits_per_dim(config, workdir) -> dict:
  """Bits/dim over the whole test split at config.checkpoint.load_step."""
  from igpt_jax import evaluation
  from igpt_jax import sharding as sharding_lib
  from igpt_jax import train as train_lib
  from igpt_jax import workdir as workdir_lib
  from igpt_jax.data import sources, transform
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.rules_from_config(config)
  cfg, params, centers, step = workdir_lib.load_pretrained(config, workdir, mesh, rules, log=quiet)
  test = sources.load(config, "test", log=quiet)
  tokenizer = transform.Tokenizer(centers, config.data.resolution, mesh, rules)
  out = evaluation.evaluate(train_lib.Trainer(cfg, config, mesh, rules), params, test, tokenizer,
                            config, prefix="test")
  return {"step": step, "test_bits_per_dim": out["test_bits_per_dim"], "test_examples": len(test)}


def probe_checkpoint(config, workdir, out_json: str) -> dict:
  """The probe stage at config.checkpoint.load_step; its results and test predictions kept."""
  from igpt_jax import probe

  def compute():
    probe.run(config, workdir, log=quiet)
    with open(os.path.join(workdir, "probe", "results.json")) as f:
      results = json.load(f)
    os.replace(os.path.join(workdir, "probe", "test_predictions.npz"),
               out_json.replace(".json", ".npz"))
    return results
  return cached(out_json, compute)


def finetune_predictions(config, workdir) -> dict:
  """Fine-tune (LP-FT, the library's defaults) and classify the whole test split."""
  import dataclasses

  import jax
  from flax import nnx

  from igpt_jax import checkpoint as checkpoint_lib
  from igpt_jax import loop
  from igpt_jax import model as model_lib
  from igpt_jax import sharding as sharding_lib
  from igpt_jax import train as train_lib
  from igpt_jax import workdir as workdir_lib
  from igpt_jax.data import pipeline, transform
  result = loop.finetune(config, workdir, log=quiet)
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.rules_from_config(config)
  from igpt_jax import probe
  test = probe.labelled_splits(config, quiet)["test"]  # the probes' test images
  cfg = dataclasses.replace(model_lib.ModelConfig.from_config(config), num_classes=test.num_classes)
  ckpt = checkpoint_lib.Checkpointer(workdir_lib.checkpoint_dir(workdir, "finetune"))
  try:
    _, state, _ = ckpt.restore_latest({"params": train_lib.abstract_params(cfg, mesh, rules)},
                                      log=quiet)
  finally:
    ckpt.close()
  graphdef = nnx.graphdef(model_lib.abstract_model(cfg))
  classify = jax.jit(lambda p, t: nnx.merge(graphdef, p).logits_and_class_logits(t)[1].argmax(-1))
  tokenizer = transform.Tokenizer(workdir_lib.load_palette(config, workdir),
                                  config.data.resolution, mesh, rules)
  preds, labels = [], []
  for batch in pipeline.eval_batches(test, batch_size=256, augment=config.data.augment):
    g = sharding_lib.global_batch({k: batch[k] for k in ("images", "boxes")}, mesh, rules, 256)
    real = batch["mask"] > 0
    preds.append(np.asarray(classify(state["params"], tokenizer(g["images"], g["boxes"])))[real])
    labels.append(batch["labels"][real])
  preds, labels = np.concatenate(preds), np.concatenate(labels)
  np.savez(os.path.join(workdir, "study", "finetune_predictions.npz"), predictions=preds,
           labels=labels)
  return {"test_accuracy": float(np.mean(preds == labels)),
          "loop_test_accuracy": result.get("test_accuracy"), "steps": result["step"],
          "head_probe": result.get("head_probe", {})}


def baselines(config, workdir_root: str) -> dict:
  """Linear probes on raw pixels (at the model's resolution, 8-bit), the quantized pixels the
  model reads (each position's palette gray), and a pooled colour histogram (the fraction of
  positions of each palette colour: no layout, like the model's mean pooling), on the probe's
  splits; predictions saved beside."""
  from igpt_jax import logreg, probe
  from igpt_jax import workdir as workdir_lib
  from igpt_jax.data import transform
  centers = workdir_lib.load_palette(config, workdir_root)
  tokenizer = transform.Tokenizer(centers, config.data.resolution)
  splits = probe.labelled_splits(config, quiet)
  feats = {"raw pixels": {}, "quantized pixels": {}, "colour histogram": {}}
  for split, data in splits.items():
    boxes = transform.eval_boxes(len(data), transform.resolve_augment(config.data.augment,
                                                                      data.full_size))
    tokens, pixels = tokenizer.numpy(np.asarray(data.images), boxes, with_pixels=True)
    n = len(tokens)
    gray = centers.mean(-1)
    feats["raw pixels"][split] = (pixels.reshape(n, 1, -1).astype(np.float32), data.labels)
    feats["quantized pixels"][split] = (gray[tokens].reshape(n, 1, -1).astype(np.float32),
                                        data.labels)
    hist = np.stack([np.bincount(t, minlength=len(centers)) for t in tokens]) / tokens.shape[1]
    feats["colour histogram"][split] = (hist[:, None].astype(np.float32), data.labels)
  out, preds = {}, {}
  for name, f in feats.items():
    r = logreg.fit_in_memory(f["train"], f["validation"], f["test"], splits["train"].num_classes,
                             tuple(config.probe.l2), steps=config.probe.steps,
                             predictions=True)[0]
    preds[name.replace(" ", "_")] = r.pop("predictions")
    out[name] = {**r, "dim": int(f["train"][0].shape[-1])}
  np.savez(os.path.join(workdir_root, "baselines.npz"), labels=splits["test"].labels, **preds)
  return out


# -- statistics -------------------------------------------------------------------------------

def bootstrap(correct: np.ndarray, other: np.ndarray | None = None, n: int = 2000,
              seed: int = 0) -> tuple[float, float, float]:
  """(estimate, low, high): accuracy, or the paired accuracy difference `correct - other`, with
  a 95% percentile interval from resampling the test images."""
  x = correct.astype(np.float32) - (0 if other is None else other.astype(np.float32))
  rng = np.random.default_rng(seed)
  means = np.concatenate([x[rng.integers(0, len(x), (100, len(x)))].mean(1)
                          for _ in range(n // 100)])
  return float(x.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def mcnemar_p(a: np.ndarray, b: np.ndarray) -> float:
  """Exact McNemar test (two-sided) of two classifiers on the same images."""
  from scipy.stats import binomtest
  only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
  if only_a + only_b == 0:
    return 1.0
  return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def verdict(diff: tuple[float, float, float]) -> str:
  _, low, high = diff
  return "holds" if low > 0 else "does not hold" if high < 0 else "not resolved"


def fmt_acc(ci) -> str:
  return f"{ci[0]:.4f} [{ci[1]:.4f}, {ci[2]:.4f}]"


def fmt_diff(ci) -> str:
  return f"{ci[0]:+.4f} [{ci[1]:+.4f}, {ci[2]:+.4f}]"


# -- the study --------------------------------------------------------------------------------

def run(args) -> dict:
  from igpt_jax.stages import fit_palette
  from igpt_jax.stages import pretrain as pretrain_stage
  path = os.path.join(args.workdir, "minutes.json")
  minutes = json.load(open(path)) if os.path.exists(path) else {}
  minutes["_path"] = path
  r = {"runs": {}, "sizes": sizes(args)}
  first = make_config("ar", 0, args)
  if not os.path.exists(first.palette.path):
    log_stage("fit palette", minutes, fit_palette.run, first, args.workdir)
  r["baselines"] = log_stage("baselines", minutes, cached,
                             os.path.join(args.workdir, "baselines.json"),
                             lambda: baselines(first, args.workdir))
  for objective, seed in RUNS:
    name = f"{objective}{seed}"
    config = make_config(objective, seed, args)
    wd = os.path.join(args.workdir, name)
    os.makedirs(os.path.join(wd, "study"), exist_ok=True)
    log_stage("pretrain", minutes, pretrain_stage.run, config, wd,
              lambda m: print(f"{name}: {m}", flush=True) if m.startswith("step") else None)
    run_out = {"checkpoints": {}}
    for step in checkpoint_steps(config):
      config.checkpoint.load_step = step
      ev = log_stage("bits/dim", minutes, cached, os.path.join(wd, "study", f"eval{step}.json"),
                     lambda: test_bits_per_dim(config, wd))
      last = step == config.train.steps
      if last and (objective, seed) == ("ar", 0):
        config.probe.labels_per_class = sizes(args)["low_data"]
        config.probe.low_data_seeds = sizes(args)["low_data_seeds"]
      pr = log_stage("probe", minutes, probe_checkpoint, config, wd,
                     os.path.join(wd, "study", f"probe{step}.json"))
      config.probe.labels_per_class = ""
      run_out["checkpoints"][str(step)] = {"evaluate": ev, "probe": pr}
      if last and objective == "bert":  # the paper's BERT protocol: one mask, and an ensemble
        config.probe.bert_masks = 1
        run_out["mask1_probe"] = log_stage("probe", minutes, probe_checkpoint, config, wd,
                                           os.path.join(wd, "study", f"probe{step}_mask1.json"))
        config.probe.bert_masks = BERT_MASKS
        run_out["masked_probe"] = log_stage("probe", minutes, probe_checkpoint, config, wd,
                                            os.path.join(wd, "study", f"probe{step}_masked.json"))
        config.probe.bert_masks = 0
    if (objective, seed) == ("ar", 0):
      config.checkpoint.load_step = 0
      run_out["finetune"] = log_stage("finetune", minutes, cached,
                                      os.path.join(wd, "study", "finetune.json"),
                                      lambda: finetune_predictions(config, wd))
    r["runs"][name] = run_out
  r["minutes"] = {k: v for k, v in minutes.items() if k != "_path"}
  return r


def analyse(r: dict, args) -> dict:
  """Intervals, findings and caveats, from the results and the saved test predictions."""
  wd = args.workdir
  base = np.load(os.path.join(wd, "baselines.npz"))
  labels = base["labels"]
  correct = {}  # name -> bool [N] over the same test images

  def add(key, preds, their_labels):
    if not np.array_equal(their_labels, labels):
      raise RuntimeError(f"{key}: test predictions are not over the same images")
    correct[key] = preds == labels

  for name in ("raw_pixels", "quantized_pixels", "colour_histogram"):
    add(name, base[name], base["labels"])
  best = {}
  for run_name, run_out in r["runs"].items():
    steps = sorted(int(s) for s in run_out["checkpoints"])
    for step in steps:
      pr = run_out["checkpoints"][str(step)]
      z = np.load(os.path.join(wd, run_name, "study", f"probe{step}.npz"))
      for key in z.files:
        if key != "labels":
          add(f"{run_name}/{step}/{key}", z[key], z["labels"])
      best[(run_name, step)] = pr["probe"]["best_layer"]
    for tag in ("mask1", "masked"):
      if f"{tag}_probe" in run_out:
        z = np.load(os.path.join(wd, run_name, "study", f"probe{steps[-1]}_{tag}.npz"))
        for key in z.files:
          if key != "labels":
            add(f"{run_name}/{tag}/{key}", z[key], z["labels"])
        best[(run_name, tag)] = run_out[f"{tag}_probe"]["best_layer"]
    if "finetune" in run_out:
      z = np.load(os.path.join(wd, run_name, "study", "finetune_predictions.npz"))
      add(f"{run_name}/finetune", z["predictions"], z["labels"])
  ci = {k: bootstrap(v) for k, v in correct.items()}
  return {"correct": correct, "ci": ci, "best": best}


def findings(r: dict, a: dict) -> list[dict]:
  """The paper's claims, each with a verdict from a paired 95% interval and a computed caveat."""
  correct, best = a["correct"], a["best"]
  last = {name: max(int(s) for s in run["checkpoints"]) for name, run in r["runs"].items()}
  first = {name: min(int(s) for s in run["checkpoints"]) for name, run in r["runs"].items()}
  layers = r["sizes"]["layers"]
  ar_runs = [n for n in r["runs"] if n.startswith("ar")]

  def best_of(name, step):
    return f"{name}/{step}/layer{best[(name, step)]}"

  def diff(x, y):
    return bootstrap(correct[x], correct[y])

  def against(other_of, label=""):
    """Each AR run's best probe (last step) minus other_of(run), paired; and their text."""
    ds = [diff(best_of(n, last[n]), other_of(n)) for n in ar_runs]
    return ds, "; ".join(f"{n}{label}: {fmt_diff(d)}" for n, d in zip(ar_runs, ds))

  def combine(diffs):  # every seed must agree for "holds" / "does not hold"
    verdicts = {verdict(d) for d in diffs}
    return verdicts.pop() if len(verdicts) == 1 else "not resolved"

  out = []
  # 1. Pretrained beats random init.
  def random_best(n):
    rows = r["runs"][n]["checkpoints"][str(last[n])]["probe"]["random_init_by_layer"]
    return f"{n}/{last[n]}/random_init_layer{max(rows, key=lambda x: x['val_accuracy'])['layer']}"

  ds, text = against(random_best)
  out.append({"claim": "Generatively pretrained features beat a random-init model's",
              "verdict": combine(ds), "numbers": text,
              "caveat": "Best layers chosen on validation for both; one random init per run."})
  # 2. Pretrained beats the pixels.
  strongest = max(("raw_pixels", "quantized_pixels", "colour_histogram"),
                  key=lambda k: correct[k].mean())
  ds, text = against(lambda n: strongest)
  out.append({"claim": "Pretrained features beat linear probes on the pixels",
              "verdict": combine(ds),
              "numbers": f"vs the strongest baseline on test ({strongest.replace('_', ' ')}, "
                         f"{correct[strongest].mean():.4f}): " + text,
              "caveat": "The baseline is picked on test, which favours it: a conservative "
                        "comparison for the claim."})
  # 3. Best layer in the middle.
  ds, notes = [], []
  for n in ar_runs:
    chosen = best[(n, last[n])]
    by_layer = r["runs"][n]["checkpoints"][str(last[n])]["probe"]["by_layer"]
    rank = 1 + sorted((x["accuracy"] for x in by_layer), reverse=True).index(
        by_layer[chosen - 1]["accuracy"])
    if chosen == layers:
      ds.append((0.0, -1.0, -1.0))  # the last layer itself: the claim fails for this run
    else:
      ds.append(diff(best_of(n, last[n]), f"{n}/{last[n]}/layer{layers}"))
    notes.append(f"{n}: layer {chosen} of {layers} (test rank {rank} of {layers})")
  out.append({"claim": "The best probe layer is in the middle of the network, not the last",
              "verdict": combine(ds),
              "numbers": "; ".join(notes) + "; chosen minus last layer: "
                         + "; ".join(f"{n}: {fmt_diff(d)}" if best[(n, last[n])] != layers
                                     else f"{n}: chosen = last" for n, d in zip(ar_runs, ds)),
              "caveat": f"The layer is chosen on {r['runs'][ar_runs[0]]['checkpoints'][str(last[ar_runs[0]])]['probe']['validation_examples']} "
                        "validation images; the interval compares it with the last layer on "
                        "test. 'Middle' here means any layer before the last."})
  # 4. Better generative model, better features (through training).
  ds, notes = [], []
  for n in ar_runs:
    cps = r["runs"][n]["checkpoints"]
    bpd = [cps[str(s)]["evaluate"]["test_bits_per_dim"] for s in (first[n], last[n])]
    ds.append(diff(best_of(n, last[n]), best_of(n, first[n])) if bpd[1] < bpd[0]
              else (0.0, -1.0, -1.0))
    notes.append(f"{n}: bits/dim {bpd[0]:.4f} -> {bpd[1]:.4f}, best probe "
                 f"{correct[best_of(n, first[n])].mean():.4f} -> "
                 f"{correct[best_of(n, last[n])].mean():.4f} ({fmt_diff(ds[-1])})")
  out.append({"claim": "A better generative model (lower bits/dim) gives better probe features",
              "verdict": combine(ds), "numbers": "; ".join(notes),
              "caveat": f"Steps {first[ar_runs[0]]} vs {last[ar_runs[0]]} of one run: lower "
                        "bits/dim and more training come together, as in the paper's Figure 3."})
  # 5 and 6. AR vs BERT, and BERT's mask ensembling.
  if "bert0" in r["runs"]:
    b = "bert0"
    masked = f"{b}/masked/layer{best[(b, 'masked')]}"
    variants = {"unmasked": best_of(b, last[b]), "one mask": f"{b}/mask1/layer{best[(b, 'mask1')]}",
                f"{BERT_MASKS} masks": masked}
    strongest = max(variants, key=lambda k: correct[variants[k]].mean())
    ds, text = against(lambda n: variants[strongest], label=" minus BERT")
    out.append({"claim": "AR features beat BERT features in linear probes",
                "verdict": combine(ds),
                "numbers": f"BERT's strongest protocol on test ({strongest}) "
                           f"{fmt_acc(a['ci'][variants[strongest]])}; " + text,
                "caveat": "One BERT seed; the same steps, model and data as AR; BERT's protocol "
                          "picked on test, which favours BERT."})
    one = variants["one mask"]
    d = diff(masked, one)
    out.append({"claim": "Ensembling masks improves BERT's linear probe (over one mask)",
                "verdict": verdict(d),
                "numbers": f"{BERT_MASKS} masks {correct[masked].mean():.4f} vs one mask "
                           f"{correct[one].mean():.4f}: {fmt_diff(d)} (unmasked inputs: "
                           f"{correct[best_of(b, last[b])].mean():.4f})",
                "caveat": "Each best layer chosen on validation separately; masks drawn as in "
                          "pretraining (15%)."})
  # 7. Fine-tuning beats the probe.
  ft_runs = [n for n in ar_runs if "finetune" in r["runs"][n]]
  for n in ft_runs:
    d = diff(f"{n}/finetune", best_of(n, last[n]))
    p = mcnemar_p(correct[f"{n}/finetune"], correct[best_of(n, last[n])])
    out.append({"claim": "Fine-tuning beats the best linear probe",
                "verdict": verdict(d),
                "numbers": f"{n}: fine-tuned {correct[f'{n}/finetune'].mean():.4f} vs best probe "
                           f"{correct[best_of(n, last[n])].mean():.4f}: {fmt_diff(d)}, McNemar "
                           f"p={p:.3g}",
                "caveat": f"{r['runs'][n]['finetune']['steps']} fine-tuning steps from the "
                          "last-layer probe (LP-FT); the best probe layer may be another."})
    last_layer = f"{n}/{last[n]}/layer{layers}"
    d = diff(f"{n}/finetune", last_layer)
    p = mcnemar_p(correct[f"{n}/finetune"], correct[last_layer])
    out.append({"claim": "Fine-tuning improves on the linear probe of the features it tunes "
                         "(the last layer's)",
                "verdict": verdict(d),
                "numbers": f"{n}: fine-tuned {correct[f'{n}/finetune'].mean():.4f} vs last-layer "
                           f"probe {correct[last_layer].mean():.4f}: {fmt_diff(d)}, McNemar "
                           f"p={p:.3g}",
                "caveat": "Not a claim of the paper's as such: what LP-FT adds to its start."})
  return out


def caveats(r: dict, a: dict) -> list[str]:
  """What limits the study, computed from its own numbers."""
  out = []
  ar_runs = [n for n in r["runs"] if n.startswith("ar")]
  if len(ar_runs) >= 2:
    accs = [a["correct"][f"{n}/{max(int(s) for s in r['runs'][n]['checkpoints'])}/layer"
                         f"{a['best'][(n, max(int(s) for s in r['runs'][n]['checkpoints']))]}"].mean()
            for n in ar_runs]
    half = np.mean([(c[2] - c[1]) / 2 for k, c in a["ci"].items() if "/layer" in k])
    out.append(f"Seeds: the AR runs' best probes differ by {abs(accs[0] - accs[1]):.4f} between "
               f"seeds; a test-set interval's half-width is {half:.4f}. The intervals cover "
               "test-set sampling only, not the pretraining seed"
               + (" -- which moves results by more than they show." if abs(accs[0] - accs[1]) > half
                  else "; the seed moved the result by less."))
  edges, fits = 0, 0
  for run in r["runs"].values():
    for cp in run["checkpoints"].values():
      for x in cp["probe"]["by_layer"]:
        fits, edges = fits + 1, edges + bool(x.get("l2_at_edge"))
  out.append(f"L2: chosen on validation from a grid widened past its edges; {edges} of {fits} "
             "layer fits still chose an edge value" + (" (their optimum is not bracketed)."
                                                       if edges else " (every optimum bracketed)."))
  z = r["sizes"]
  out.append(f"Scale: {z['steps'] * 64 / TRAIN_IMAGES:.2f} epochs of 54k {z['resolution']}x"
             f"{z['resolution']} gray images, a {z['layers']}-layer d={z['width']} model, far "
             "from the paper's ImageNet-scale models: a finding here says what holds at this "
             "scale, not what holds for iGPT.")
  return out


def write(r: dict, a: dict, args) -> str:
  from matplotlib.figure import Figure
  z = r["sizes"]
  found, limits = findings(r, a), caveats(r, a)
  ci = a["ci"]
  command = f".venv/bin/python experiments/fmnist.py --workdir={args.workdir}" + (
      " --quick" if args.quick else f" --epochs={args.epochs} --finetune_steps={args.finetune_steps}")
  n_test = len(a["correct"]["raw_pixels"])
  lines = [
      "# What iGPT's findings look like on Fashion-MNIST", "",
      "Generated by `experiments/fmnist.py`; every number, verdict and caveat below is computed "
      "by the script.", "",
      f"Command (2 CPU cores, {sum(r['minutes'].values()):.0f} minutes): `{command}`", "",
      "## Setup", "",
      f"- Data: Fashion-MNIST at {z['resolution']}x{z['resolution']} gray, a 16-level palette "
      "fitted by k-means; pretraining on the 54k train images left after a 6k validation "
      "hold-out.",
      f"- Model: {z['layers']} layers, d={z['width']}, 4 heads; {z['steps']} steps at batch 64 "
      f"({z['steps'] * 64 / TRAIN_IMAGES:.2f} epochs) per run: L_AR with seeds 0 and 1, L_BERT "
      "with seed 0.",
      f"- Linear probes on every layer at steps {', '.join(map(str, checkpoint_steps(make_config('ar', 0, args))))}: "
      f"{z['probe_train'] or 'all'} train / {z['probe_val']} validation (chooses L2 and the "
      f"layer) / {n_test} test images (the whole test split unless --quick).",
      f"- Fine-tuning: AR seed 0, {z['finetune_steps']} steps, head from the last-layer probe "
      "(LP-FT), scored on the same test images as the probes.",
      "- Intervals: 95% percentile bootstrap over the test images (2,000 resamples); "
      "differences are paired (the same resampled images for both). A finding holds when its "
      "interval is above zero for every run it covers, does not hold when below, and is not "
      "resolved otherwise.", "",
      "## Findings", "", "| the paper's finding | here | numbers (95% interval) | caveat |",
      "|---|---|---|---|"]
  for f in found:
    mark = {"holds": "holds", "does not hold": "**does not hold**",
            "not resolved": "*not resolved*"}[f["verdict"]]
    lines.append(f"| {f['claim']} | {mark} | {f['numbers']} | {f['caveat']} |")
  lines += ["", "## Probe accuracy by layer (test, 95% interval)", ""]
  runs = list(r["runs"])
  for name in runs:
    steps = sorted(int(s) for s in r["runs"][name]["checkpoints"])
    head = "| layer | " + " | ".join(f"step {s}" for s in steps) + " | random init |"
    lines += [f"### {name}", "", head, "|---" * (len(steps) + 2) + "|"]
    for l in range(1, z["layers"] + 1):
      cells = [fmt_acc(ci[f"{name}/{s}/layer{l}"]) + (" *" if a["best"][(name, s)] == l else "")
               for s in steps]
      cells.append(f"{ci[f'{name}/{steps[-1]}/random_init_layer{l}'][0]:.4f}")
      lines.append(f"| {l} | " + " | ".join(cells) + " |")
    bpd = [r["runs"][name]["checkpoints"][str(s)]["evaluate"]["test_bits_per_dim"] for s in steps]
    lines += ["", "Test bits/dim by step: " + ", ".join(f"{s}: {b:.4f}" for s, b in zip(steps, bpd))
              + ("" if name.startswith("ar") else " (BERT: over its masked 15% of positions, "
                 "predicted from the rest; not comparable with AR's)")
              + ". * = the layer chosen on validation.", ""]
    for tag, what in (("mask1", "With one mask"), ("masked", f"With {BERT_MASKS} masks")):
      if f"{tag}_probe" in r["runs"][name]:
        lines += [f"{what} (step {steps[-1]}): "
                  + ", ".join(f"layer {l} {ci[f'{name}/{tag}/layer{l}'][0]:.4f}"
                              for l in range(1, z["layers"] + 1)) + ".", ""]
  lines += ["## Baselines (test, 95% interval)", "", "| features | dims | accuracy | L2 |",
            "|---|---|---|---|"]
  for name, b in r["baselines"].items():
    lines.append(f"| {name} | {b['dim']} | {fmt_acc(ci[name.replace(' ', '_')])} | {b['l2']:g} |")
  low = next((cp["probe"].get("low_data") for run in r["runs"].values()
              for cp in run["checkpoints"].values() if cp["probe"].get("low_data")), None)
  if low:
    lines += ["", "## Low-data probes (ar0, last step)", "",
              "| labels per class | best layer (validation) | test accuracy, mean +- std over draws |",
              "|---|---|---|"]
    for x in low:
      lines.append(f"| {x['labels_per_class']} | {x['best_layer']} | {x['best_mean']:.4f} +- "
                   f"{x['best_std']:.4f} ({x['seeds']} draws) |")
  for n, run in r["runs"].items():
    if "finetune" in run:
      head = run["finetune"]["head_probe"]
      lines += ["", f"Fine-tuned {n}: {fmt_acc(ci[f'{n}/finetune'])} on the test images"
                + (f" (its head, the last-layer probe, had validation accuracy "
                   f"{head['val_accuracy']:.4f} with L2 {head['l2']:g})." if head else ".")]
  lines += ["", "![probe accuracy by layer](fmnist_probe_by_layer.png)", "", "## Caveats", ""]
  lines += [f"- {c}" for c in limits]
  lines += ["", "Minutes per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in r["minutes"].items())
            + ".", ""]

  fig = Figure(figsize=(7, 4.5))
  ax = fig.subplots()
  layer_axis = list(range(1, z["layers"] + 1))
  for name in runs:
    s = max(int(x) for x in r["runs"][name]["checkpoints"])
    est = [ci[f"{name}/{s}/layer{l}"] for l in layer_axis]
    ax.errorbar(layer_axis, [e[0] for e in est],
                yerr=[[e[0] - e[1] for e in est], [e[2] - e[0] for e in est]], capsize=2,
                marker="o" if name.startswith("ar") else "s", label=f"{name} step {s}")
  ax.plot(layer_axis, [ci[f"ar0/{max(int(x) for x in r['runs']['ar0']['checkpoints'])}"
                          f"/random_init_layer{l}"][0] for l in layer_axis], "^--",
          label="random init")
  for name, style in (("raw_pixels", ":"), ("quantized_pixels", "-."), ("colour_histogram", "--")):
    ax.axhline(ci[name][0], color="gray", linestyle=style, label=name.replace("_", " "))
  ax.set_xlabel("layer")
  ax.set_ylabel(f"test accuracy ({n_test} images)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(args.out, exist_ok=True)
  fig.savefig(os.path.join(args.out, "fmnist_probe_by_layer.png"), dpi=100)
  path = os.path.join(args.out, "RESULTS.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  summary = {"results": r, "findings": found, "caveats": limits,
             "intervals": {k: list(v) for k, v in ci.items()}}
  with open(os.path.join(args.out, "fmnist_results.json"), "w") as f:
    json.dump(summary, f, indent=1, default=str)
  return path


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="runs/fmnist")
  parser.add_argument("--out", default=HERE, help="where RESULTS.md, the plot and the JSON go")
  parser.add_argument("--epochs", type=float, default=1.0, help="pretraining epochs per run")
  parser.add_argument("--finetune_steps", type=int, default=300)
  parser.add_argument("--quick", action="store_true",
                      help="toy sizes: the whole script in minutes, to check it end to end")
  args = parser.parse_args(argv)
  if args.epochs <= 0 or args.finetune_steps <= 0:
    print("error: --epochs and --finetune_steps must be positive", file=sys.stderr)
    return 2
  from igpt_jax.data import sources
  if sources.fashion_mnist_dir() is None:
    print("error: Fashion-MNIST not found (Debian package dataset-fashion-mnist)", file=sys.stderr)
    return 2
  os.makedirs(args.workdir, exist_ok=True)
  results = run(args)
  print(f"Written {write(results, analyse(results, args), args)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
