"""Linear probes: the paper's f_l = mean_i norm(h_l) for the probed layers, a logistic
regression on each.

One forward pass per split, under the training mesh and sharding rules, extracts every probed
layer's features (and the pixels, for the raw-pixel baseline); each process streams its rows to
<workdir>/probe/features/ in float16 around each chunk's mean (features.py), so no host ever
holds a split; the store is reused only for the same weights, model, palette and data. Before
extracting, the disk it takes is said (and refused in one line when there is no room). The
regressions (logreg.py) use the paper's full-batch L-BFGS whenever one layer's features fit in
`probe.max_memory_mb` (every layer at once when they all fit, else one at a time), and
mini-batch Adam streamed from the store over the mesh only when one layer alone does not; the
L2 strength is chosen on the validation split. At ImageNet size `probe.select_examples` picks
the layers on a subsample first, so only the best and its neighbours are extracted whole. The
report (probe_report.py) compares against raw pixels and the same probe on a randomly
initialised model (`probe.baselines`), and adds the concatenation of the best layers (the
paper's multi-layer features; `probe.concat`).
"""

from __future__ import annotations

import dataclasses
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
  """Host memory the L-BFGS path peaks at for `groups` groups of `dim` features: the three
  splits as float32 [N, G, D], plus, while the largest split is loaded, its chunks before
  concatenation (another copy of it), plus one group of every split standardised (a numpy and
  a device copy on a CPU backend)."""
  sizes = [s.num_examples * groups * dim * 4 for s in stores]
  return sum(sizes) + max(sizes) + 2 * sum(sizes) // max(groups, 1)


def choose_solver(stores: tuple, groups: int, dim: int, config) -> tuple[str, str]:
  """(solver, why). The paper's L-BFGS whenever it fits probe.max_memory_mb: every group at
  once, else one group (layer) in memory at a time; mini-batch Adam streamed from the store
  only when one group alone does not fit. probe.solver='lbfgs' / 'adam' forces one."""
  budget = config.probe.max_memory_mb * 2**20
  every, one = in_memory_peak_bytes(stores, groups, dim), in_memory_peak_bytes(stores, 1, dim)
  gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
  limit = f"probe.max_memory_mb={config.probe.max_memory_mb}"
  if config.probe.solver == "adam":
    return "adam", "probe.solver=adam"
  if config.probe.solver == "lbfgs" and every <= budget:
    return "lbfgs", "probe.solver=lbfgs"
  if config.probe.solver == "lbfgs":
    return "lbfgs_per_layer", (f"probe.solver=lbfgs; all {groups} layers ({gib(every)}) "
                               f"exceed {limit}")
  if every <= budget:
    return "lbfgs", f"all {groups} groups' features ({gib(every)}) fit {limit}"
  if one <= budget:
    return "lbfgs_per_layer", (f"one group's features ({gib(one)}) fit {limit}, all {groups} "
                               f"({gib(every)}) do not")
  return "adam", f"one group's features alone ({gib(one)}) exceed {limit}"


def _fit(stores: tuple, num_classes: int, config, mesh, rules, view=None,
         log=None) -> list[dict]:
  """(train, val, test) stores -> one result per group (layer or concatenation), each naming
  its solver and why (`choose_solver`)."""
  from igpt_jax import distributed, logreg
  p = config.probe
  train = stores[0]
  view = [[g] for g in range(train.groups)] if view is None else view
  dim = train.dim * len(view[0])
  solver, why = choose_solver(stores, len(view), dim, config)
  if solver == "lbfgs":
    results = logreg.fit_in_memory(*(s.load(view) for s in stores), num_classes, tuple(p.l2),
                                   steps=p.steps, predictions=True)
  elif solver == "lbfgs_per_layer":
    results = []
    for group in view:  # one group's three splits in memory, then the next
      distributed.PREEMPTION.check("probe")
      results += logreg.fit_in_memory(*(s.load([group]) for s in stores), num_classes,
                                      tuple(p.l2), steps=p.steps, predictions=True)
  else:
    results = logreg.fit_streamed(*stores, num_classes, tuple(p.l2), mesh=mesh, rules=rules,
                                  batch_size=p.fit_batch_size, epochs=p.epochs, lr=p.lr,
                                  seed=config.seed, view=view, log=log,
                                  buffer_bytes=p.max_memory_mb * 2**20 // 2)
  if log:
    log(f"probe fit of {len(view)} group(s) of {dim} features: {solver} ({why}).")
  return [{**r, "solver": solver, "solver_reason": why} for r in results]


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


def _subset(data, n: int, seed: int):
  if not n or n >= len(data):
    return data
  idx = np.sort(np.random.default_rng(seed).permutation(len(data))[:n])
  return data.subset(idx, f"{data.name}[{n} examples]")


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
  selection = None
  if _selects(target, config):
    target, selection = select_on_subsample(target, config, log)
    times["select_s"] = time.perf_counter() - began
    began = time.perf_counter()
  stores = extract(target, config, log)
  times["extract_s"] = time.perf_counter() - began
  began = time.perf_counter()
  fits = fit_all(target, stores, config, log)
  fits["selection"] = selection
  times["fit_s"] = time.perf_counter() - began
  from igpt_jax import probe_report
  return probe_report.report(target, stores, fits, times, config, log)


def _selects(target: "Target", config) -> bool:
  n = config.probe.select_examples
  return bool(n) and len(target.splits["train"]) > n and len(target.layers) > 1


def select_on_subsample(target: "Target", config, log) -> tuple["Target", dict]:
  """Every probed layer fitted on probe.select_examples train and validation examples (their
  features in probe/select/); -> the target narrowed to the best layer (by validation
  accuracy, as always) and its probe.concat nearest neighbours, and what was measured."""
  n, p = config.probe.select_examples, config.probe
  small = config.copy_and_resolve_references()
  small.probe.baselines = "none"  # the baselines are probed on the whole splits only
  splits = {"train": _subset(target.splits["train"], n, config.seed),
            "validation": _subset(target.splits["validation"], n, config.seed)}
  sub = dataclasses.replace(target, splits=splits, out_dir=target.out_dir / "select")
  log(f"probe: choosing among layers {target.layers} on {len(splits['train'])} train and "
      f"{len(splits['validation'])} validation examples (probe.select_examples={n}).")
  stores = extract(sub, small, log)
  train, val = stores[("pretrained", "train")], stores[("pretrained", "validation")]
  fits = _fit((train, val, val), target.splits["train"].num_classes, small, target.mesh,
              target.rules, None, log)
  by_layer = [{"layer": layer, "val_accuracy": r["val_accuracy"], "l2": r["l2"]}
              for layer, r in zip(target.layers, fits)]
  best = max(by_layer, key=lambda r: r["val_accuracy"])["layer"]
  chosen = [target.layers[i] for i in concat_groups(best, target.layers, p.concat)]
  log(f"probe: layer {best} is best on the subsample ("
      + ", ".join(f"{r['layer']}: {r['val_accuracy']:.4f}" for r in by_layer)
      + f"); extracting layers {chosen} on the whole splits.")
  return dataclasses.replace(target, layers=chosen), {
      "examples": len(splits["train"]), "validation_examples": len(splits["validation"]),
      "by_layer": by_layer, "best_layer": best, "layers": chosen}


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
  models = {"pretrained": t.params}
  if p.baselines == "all":
    models["random_init"] = train_lib.init_params(t.cfg, t.mesh, t.rules, config.seed + 1)
  planned = []  # (tag, params, split, data, key, {store name: path}, complete)
  for tag, prm in models.items():
    names = [tag] + (["pixels"] if tag == "pretrained" and p.baselines != "none" else [])
    for split, data in t.splits.items():
      key = {"model": t.identity if tag == "pretrained" else f"init_seed{config.seed + 1}",
             "model_config": dataclasses.asdict(t.cfg), "palette": t.palette_hash,
             "split": split, "examples": len(data), "data": data.name, "layers": t.layers,
             "seed": config.seed, "resolution": config.data.resolution,
             "batch_size": p.batch_size,
             # the evaluation crop itself, not its name: a changed view is other features
             "view": transform.eval_boxes(1, transform.resolve_augment(
                 config.data.augment, data.full_size))[0].tolist(),
             "mesh": dict(t.mesh.shape), "processes": jax.process_count(),
             "bert_masks": t.bert_masks}
      paths = {n: t.out_dir / "features" / f"{n}-{split}" for n in names}
      done = all(features_lib.Store.complete(paths[n], key) for n in names)
      planned.append((tag, prm, split, data, key, paths, not distributed.any_process(not done)))
  say_cost(t, [(tag, len(data), list(paths)) for tag, _, _, data, _, paths, done in planned
               if not done], config, log)
  stores = {}
  for tag, prm, split, data, key, paths, done in planned:
    names = list(paths)
    if done:
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


def say_cost(t: Target, pending: list, config, log) -> None:
  """Before extracting: the disk the stores will take (float16 features, uint8 pixels, a label
  each), and the forward passes' compute, at the devices' peak where `targets` knows them;
  one error line when the features directory's disk has no room for them."""
  import jax

  from igpt_jax import features as features_lib
  from igpt_jax import model as model_lib
  from igpt_jax import targets
  if not pending:
    return
  row = {"pixels": config.data.resolution ** 2 * config.data.channels}  # uint8
  layer_row = len(t.layers) * t.cfg.d_model * 2  # float16
  needed = sum(n * (row.get(name, layer_row) + 4) for _, n, names in pending for name in names)
  images = sum(n for _, n, _ in pending)
  flops = model_lib.flops_per_token(t.cfg) / 3 * t.cfg.seq_len * images * max(t.bert_masks, 1)
  devices = jax.devices()
  chip = targets.chip_for_device_kind(devices[0].device_kind)
  at_peak = (f"; at least {flops / (chip.peak_flops * len(devices)) / 3600:.2g} h of forward "
             f"passes at the {len(devices)} devices' peak" if chip else "")
  directory = t.out_dir / "features"
  stores = sorted({name for _, _, names in pending for name in names})
  size = f"{needed / 1e9:.3g} GB" if needed >= 1e8 else f"{needed / 1e6:.3g} MB"
  log(f"probe: extracting {images:,} image passes ({len(t.layers)} layer(s) of {t.cfg.d_model} "
      f"features; stores {', '.join(stores)}): {size} in {directory}, {flops:.3g} FLOPs of "
      f"forward passes{at_peak}. Progress below says the measured rate.")
  features_lib.check_room(directory, needed)


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
  baselines = config.probe.baselines
  random_by_layer = ([{"layer": l, **r} for l, r in zip(layers, fit("random_init"))]
                     if baselines == "all" else [])
  best = max(by_layer, key=lambda r: r["val_accuracy"])
  group = concat_groups(best["layer"], layers, config.probe.concat)
  return {"by_layer": by_layer, "random_by_layer": random_by_layer, "best": best,
          "best_random": (max(random_by_layer, key=lambda r: r["val_accuracy"])
                          if random_by_layer else {"accuracy": None}),
          "group": group, "multi": fit("pretrained", [group])[0],
          "raw": fit("pixels")[0] if baselines != "none" else {"accuracy": None},
          "low": (low_data(of("pretrained"), layers, k, config, log)
                  if config.probe.labels_per_class else [])}
