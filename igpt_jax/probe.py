"""Linear probes: the paper's f_l = mean_i norm(h_l) for every layer, logistic regression on each.

One forward pass per split extracts every layer's features (model.features); they are cached in
<workdir>/probe/. Each layer's features are standardised and fitted with multinomial logistic
regression by full-batch L-BFGS; the L2 strength is chosen on a held-out part of the train split.
The report compares against raw pixels and the same probe on a randomly initialised model, and
adds the concatenation of the best layer with its neighbours (the paper's multi-layer features).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax


# -- logistic regression ----------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("steps",))
def _fit_one(x, y_onehot, l2, steps: int):
  """Multinomial logistic regression by L-BFGS: min mean CE + l2/2 |W|^2 (bias unpenalised)."""
  d, c = x.shape[1], y_onehot.shape[1]
  params = {"w": jnp.zeros((d, c)), "b": jnp.zeros((c,))}

  def loss(p):
    logits = x @ p["w"] + p["b"]
    ce = -jnp.mean(jnp.sum(y_onehot * jax.nn.log_softmax(logits), axis=-1))
    return ce + 0.5 * l2 * jnp.sum(p["w"] ** 2)

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(carry, _):
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
    return (optax.apply_updates(p, updates), state), value

  (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
  return params


def _standardise(train, *others):
  mean, std = train.mean(0), train.std(0) + 1e-6
  return [(a - mean) / std for a in (train, *others)]


def logistic_regression(x_train, y_train, x_test, y_test, num_classes: int,
                        l2_grid=(1e-4, 1e-3, 1e-2, 1e-1), val_fraction: float = 0.1,
                        steps: int = 200, seed: int = 0) -> dict:
  """Test accuracy of the probe, with L2 chosen on a held-out part of the train split."""
  x_train, x_test = np.asarray(x_train, np.float32), np.asarray(x_test, np.float32)
  order = np.random.default_rng(seed).permutation(len(x_train))
  n_val = max(1, int(len(x_train) * val_fraction))
  val, fit = order[:n_val], order[n_val:]
  xs_fit, xs_val = _standardise(x_train[fit], x_train[val])
  onehot = lambda y: jax.nn.one_hot(y, num_classes)
  accuracy = lambda p, x, y: float(jnp.mean(jnp.argmax(x @ p["w"] + p["b"], -1) == y))
  val_acc = {}
  for l2 in l2_grid:
    p = _fit_one(jnp.asarray(xs_fit), onehot(y_train[fit]), l2, steps)
    val_acc[l2] = accuracy(p, jnp.asarray(xs_val), y_train[val])
  best_l2 = max(val_acc, key=val_acc.get)
  xs_all, xs_test = _standardise(x_train, x_test)
  p = _fit_one(jnp.asarray(xs_all), onehot(y_train), best_l2, steps)
  return {"accuracy": accuracy(p, jnp.asarray(xs_test), y_test), "l2": best_l2,
          "val_accuracy": val_acc[best_l2]}


# -- features ---------------------------------------------------------------------------------

def extract_features(graphdef, params, tokens: np.ndarray, mesh, rules, batch_size: int = 256,
                     log=None) -> np.ndarray:
  """[N, seq] tokens (the same on every process) -> [num_layers, N, d_model] float32.

  One forward pass per global batch, sharded over the mesh like training (each process feeds
  the rows its devices hold); the features are gathered back whole on every process."""
  from flax import nnx

  from igpt_jax import distributed
  from igpt_jax import sharding as sharding_lib
  jitted = jax.jit(lambda p, t: nnx.merge(graphdef, p).features(t))
  lo, hi = sharding_lib.host_rows(mesh, rules, batch_size)
  out = []
  for start in range(0, len(tokens), batch_size):
    chunk = tokens[start:start + batch_size]
    padded = np.pad(chunk, ((0, batch_size - len(chunk)), (0, 0)))
    batch = sharding_lib.global_batch({"tokens": padded[lo:hi]}, mesh, rules, batch_size)
    with sharding_lib.activation_sharding(mesh, rules):
      feats = jitted(params, batch["tokens"])
    out.append(distributed.to_host(feats)[:, :len(chunk)])
    if log and (start // batch_size) % 20 == 0:
      log(f"features: {start + len(chunk)}/{len(tokens)}")
  return np.concatenate(out, axis=1)


def cached_features(path, extract, num_examples: int) -> np.ndarray:
  """Features read from `path` when every process finds them there, else extracted (all
  processes together) and written by process 0."""
  import io

  from etils import epath

  from igpt_jax import distributed
  path = epath.Path(path)
  cached = None
  if path.exists():
    cached = np.load(io.BytesIO(path.read_bytes()))["features"]
    if cached.shape[1] != num_examples:
      cached = None
  if not distributed.any_process(cached is None):
    return cached
  feats = extract()
  if distributed.is_chief():
    from igpt_jax import workdir as workdir_lib
    buffer = io.BytesIO()
    np.savez(buffer, features=feats)
    workdir_lib.write_bytes(path, buffer.getvalue())
  return feats


# -- report -----------------------------------------------------------------------------------

def probe_layers(feats_train, y_train, feats_test, y_test, num_classes, probe_config, log=print):
  by_layer = []
  for layer in range(feats_train.shape[0]):
    r = logistic_regression(feats_train[layer], y_train, feats_test[layer], y_test, num_classes,
                            l2_grid=tuple(probe_config.l2), steps=probe_config.steps)
    by_layer.append({"layer": layer + 1, **r})
    log(f"probe layer {layer + 1}: accuracy {r['accuracy']:.4f} (l2={r['l2']:g})")
  return by_layer


def write_tensorboard(results: dict, out_dir) -> None:
  """Accuracy by layer as TensorBoard scalars (step = layer) and the plot as an image."""
  import io

  from PIL import Image

  from igpt_jax import distributed
  from igpt_jax import metrics as metrics_lib
  if not distributed.is_chief():
    return
  writer = metrics_lib.MetricsWriter(out_dir)
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
  lines += ["", f"Best layer {results['best_layer']}: {results['best_accuracy']:.4f}; "
            f"multi-layer ({results['multi_layer']['layers']}): "
            f"{results['multi_layer']['accuracy']:.4f}; random init (best layer): "
            f"{results['random_init_accuracy']:.4f}; raw pixels: "
            f"{results['raw_pixel_accuracy']:.4f}."]
  workdir_lib.write_text(out_dir / "results.md", "\n".join(lines) + "\n")
  from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  layers = [r["layer"] for r in results["by_layer"]]
  ax.plot(layers, [r["accuracy"] for r in results["by_layer"]], "o-", label="pretrained")
  if rand:
    ax.plot(layers, [rand[l] for l in layers], "s--", label="random init")
  ax.axhline(results["raw_pixel_accuracy"], color="gray", linestyle=":", label="raw pixels")
  ax.set_xlabel("layer")
  ax.set_ylabel("linear probe accuracy")
  ax.legend()
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=100)
  workdir_lib.write_bytes(plot_path, png.getvalue())
  return results


def _subset(data, n: int, seed: int):
  if not n or n >= len(data):
    return data
  idx = np.sort(np.random.default_rng(seed).permutation(len(data))[:n])
  return data.subset(idx, f"{data.name}[{n} examples]")


def run(config, workdir, log=print) -> dict:
  """Stage probe: every layer of the pretrained model vs raw pixels and a random-init model.

  Feature extraction runs on every process over the mesh; every process then fits the same
  (small) probes on the gathered features, and process 0 writes the report."""
  from flax import nnx

  from igpt_jax import model as model_lib
  from igpt_jax import sharding as sharding_lib
  from igpt_jax import train as train_lib
  from igpt_jax import workdir as workdir_lib
  from igpt_jax.config import UserError
  from igpt_jax.data import pipeline, sources
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.rules_from_config(config)
  cfg, params, centers, step = workdir_lib.load_pretrained(config, workdir, mesh, rules, log=log)
  train = _subset(sources.load(config, "train", log=log), config.probe.train_examples, config.seed)
  test = _subset(sources.load(config, "test", log=log), config.probe.test_examples, config.seed)
  if train.num_classes < 2:
    raise UserError(f"The probe needs labelled data; {train.name} has no classes.")
  res = config.data.resolution
  aug = config.data.augment
  tok_tr, pix_tr = pipeline.tokens_of(train, centers, res, with_pixels=True, augment=aug)
  tok_te, pix_te = pipeline.tokens_of(test, centers, res, with_pixels=True, augment=aug)
  out_dir = workdir_lib.path(workdir) / "probe"
  bs, p = config.probe.batch_size, config.probe
  graphdef = nnx.graphdef(model_lib.abstract_model(cfg))
  feats = {}
  random_params = train_lib.init_params(cfg, mesh, rules, config.seed + 1)
  for tag, prm in (("pretrained", params), ("random_init", random_params)):
    suffix = f"{tag}_step{step}" if tag == "pretrained" else f"{tag}_seed{config.seed + 1}"
    log(f"Extracting {tag} features of {len(tok_tr)} train and {len(tok_te)} test images...")
    feats[tag] = tuple(
        cached_features(out_dir / f"features_{suffix}_{split}.npz",
                        lambda t=tokens, prm=prm: extract_features(graphdef, prm, t, mesh, rules,
                                                                  bs, log), len(tokens))
        for split, tokens in (("train", tok_tr), ("test", tok_te)))
  k = train.num_classes
  by_layer = probe_layers(feats["pretrained"][0], train.labels, feats["pretrained"][1], test.labels,
                          k, p, log)
  random_by_layer = probe_layers(feats["random_init"][0], train.labels, feats["random_init"][1],
                                 test.labels, k, p, lambda *_: None)
  best = max(by_layer, key=lambda r: r["accuracy"])
  layers = [l for l in (best["layer"] - 1, best["layer"], best["layer"] + 1)
            if 1 <= l <= len(by_layer)]
  concat = lambda f: np.concatenate([f[l - 1] for l in layers], axis=-1)
  multi = logistic_regression(concat(feats["pretrained"][0]), train.labels,
                              concat(feats["pretrained"][1]), test.labels, k, tuple(p.l2), steps=p.steps)
  flat = lambda x: x.reshape(len(x), -1).astype(np.float32) / 255.0
  raw = logistic_regression(flat(pix_tr), train.labels, flat(pix_te), test.labels, k,
                            tuple(p.l2), steps=p.steps)
  results = {
      "checkpoint_step": step, "train_examples": len(train), "test_examples": len(test),
      "by_layer": by_layer, "best_layer": best["layer"], "best_accuracy": best["accuracy"],
      "multi_layer": {"layers": layers, **multi},
      "random_init_by_layer": random_by_layer,
      "random_init_accuracy": max(r["accuracy"] for r in random_by_layer),
      "raw_pixel_accuracy": raw["accuracy"],
  }
  results = write_report(results, out_dir)
  write_tensorboard(results, out_dir)
  log(f"Probe: best layer {best['layer']} {best['accuracy']:.4f}; random init "
      f"{results['random_init_accuracy']:.4f}; raw pixels {raw['accuracy']:.4f}. Report in {out_dir}")
  return {"stage": "probe", "results": str(out_dir / "results.json"),
          **{k: results[k] for k in ("best_layer", "best_accuracy", "random_init_accuracy",
                                     "raw_pixel_accuracy")}}
