"""Pretraining: one functional train step under `jax.jit` with explicit shardings, and the loop
around it (data, checkpoints, metrics, preemption).

The train state is a plain pytree {'params', 'opt_state', 'step'}; the model's graph definition
is split off once and merged back inside the jitted step, so the hot path never walks Python
objects. Everything random is a function of (seed, step): a run resumed from a checkpoint
computes bit-for-bit what an uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from igpt_jax import checkpoint as checkpoint_lib
from igpt_jax import metrics as metrics_lib
from igpt_jax import model as model_lib
from igpt_jax import objectives
from igpt_jax import optim
from igpt_jax import sharding as sharding_lib


class NonFiniteLoss(RuntimeError):
  pass


def _pure(state: nnx.State):
  return nnx.to_pure_dict(state)


def train_section(config, stage: str = "pretrain"):
  """config.train, with config.finetune's fields laid over it for the finetune stage."""
  import ml_collections
  section = ml_collections.ConfigDict(config.train.to_dict())
  if stage == "finetune":
    for key, value in config.finetune.items():
      if key in section:
        section[key] = value
  return section


@dataclasses.dataclass
class Trainer:
  """Everything compiled once for one model shape, optimiser, mesh and stage."""
  cfg: model_lib.ModelConfig
  config: object
  mesh: jax.sharding.Mesh
  rules: tuple
  stage: str = "pretrain"  # or 'finetune': class head, labels, L_GEN + L_CLF
  graphdef: object = None
  tx: object = None
  state_shardings: object = None
  abstract_state: object = None

  def __post_init__(self):
    self.train_cfg = train_section(self.config, self.stage)
    abstract = model_lib.abstract_model(self.cfg)
    self.graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    param_shardings = _pure(sharding_lib.shardings_for(abstract_params, self.mesh, self.rules))
    self.tx = optim.make_optimizer(self.train_cfg)
    self.abstract_state = jax.eval_shape(self._init_fn, jax.random.key(0))
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    opt_shardings = optax.tree_map_params(
        self.tx, lambda _, s: s, self.abstract_state["opt_state"], param_shardings,
        transform_non_params=lambda _: replicated)
    self.state_shardings = {"params": param_shardings, "opt_state": opt_shardings,
                            "step": replicated}
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        self.abstract_state, self.state_shardings)
    self.batch_sharding = sharding_lib.batch_sharding(self.mesh, self.rules)

  # -- state ---------------------------------------------------------------------------------

  def _init_fn(self, key):
    model = model_lib.ImageGPT(self.cfg, rngs=nnx.Rngs(key))
    params = _pure(nnx.state(model, nnx.Param))
    return {"params": params, "opt_state": self.tx.init(params),
            "step": jnp.zeros((), jnp.int32)}

  def init_state(self, seed: int):
    """Parameters are created already sharded: nothing is ever whole on one device."""
    with sharding_lib.activation_sharding(self.mesh, self.rules):
      return jax.jit(self._init_fn, out_shardings=self.state_shardings)(jax.random.key(seed))

  # -- step ----------------------------------------------------------------------------------

  def loss_fn(self, params, batch, rng):
    """(loss, metrics): L_AR or L_BERT; for finetune, gen_weight * L_GEN + L_CLF."""
    model = nnx.merge(self.graphdef, params)
    tokens = batch["tokens"]
    mask = None if self.cfg.causal else objectives.bert_mask(rng, tokens.shape)
    if self.stage != "finetune":
      logits = model(tokens, mask)
      gen = (objectives.ar_loss(logits, tokens) if mask is None
             else objectives.bert_loss(logits, tokens, mask))
      return gen, {}
    logits, class_logits = model.logits_and_class_logits(tokens, mask)
    gen = (objectives.ar_loss(logits, tokens) if mask is None
           else objectives.bert_loss(logits, tokens, mask))
    clf = objectives.clf_loss(class_logits, batch["labels"])
    loss = objectives.finetune_loss(gen, clf, self.config.finetune.gen_weight)
    return loss, {"gen_loss": gen, "clf_loss": clf,
                  "accuracy": objectives.accuracy(class_logits, batch["labels"])}

  def _step_fn(self, state, batch):
    rng = jax.random.fold_in(jax.random.key(self.config.seed), state["step"])
    accum = self.train_cfg.accum_steps
    grad_fn = jax.value_and_grad(self.loss_fn, has_aux=True)
    if accum == 1:
      (loss, aux), grads = grad_fn(state["params"], batch, rng)
    else:
      # Micro-batch i is every accum-th example, so each device keeps its own rows.
      micro = jax.tree.map(
          lambda x: jnp.moveaxis(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 1, 0), batch)

      def body(carry, xs):
        i, mb = xs
        (loss_i, aux_i), grads_i = grad_fn(state["params"], mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (loss_i, aux_i, grads_i)), None

      (loss_s, aux_s), grads_s = jax.eval_shape(
          grad_fn, state["params"], jax.tree.map(lambda x: x[0], micro), rng)
      zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (loss_s, aux_s, grads_s))
      (loss, aux, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
      loss, aux, grads = jax.tree.map(lambda x: x / accum, (loss, aux, grads))
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
    out = {"loss": loss, "grad_norm": optax.tree.norm(grads),
           "lr": optim.learning_rate(self.train_cfg)(state["step"]), **aux}
    return new_state, out

  def batch_keys(self):
    return ("tokens", "labels") if self.stage == "finetune" else ("tokens",)

  def jit_step(self):
    batch_shardings = {k: sharding_lib.batch_sharding(self.mesh, self.rules, 2 if k == "tokens" else 1)
                       for k in self.batch_keys()}
    return jax.jit(self._step_fn, in_shardings=(self.state_shardings, batch_shardings),
                   out_shardings=(self.state_shardings, None), donate_argnums=0)

  def abstract_batch(self):
    b = self.train_cfg.batch_size
    out = {"tokens": jax.ShapeDtypeStruct((b, self.cfg.seq_len), jnp.int32,
                                          sharding=self.batch_sharding)}
    if self.stage == "finetune":
      out["labels"] = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sharding_lib.batch_sharding(
          self.mesh, self.rules, 1))
    return out

  def compile_step(self):
    """Ahead-of-time compile; the plan stage and the loop share it."""
    if self.train_cfg.batch_size % self.train_cfg.accum_steps:
      raise ValueError(f"batch_size={self.train_cfg.batch_size} is not divisible by "
                       f"accum_steps={self.train_cfg.accum_steps}.")
    with sharding_lib.activation_sharding(self.mesh, self.rules):
      return self.jit_step().lower(self.abstract_state, self.abstract_batch()).compile()

  def eval_fn(self):
    """Sums over a padded batch (mask weights examples): NLL, tokens, and for a class head
    correct predictions and examples."""
    def fn(params, tokens, labels, mask):
      model = nnx.merge(self.graphdef, params)
      bert = None if self.cfg.causal else objectives.bert_mask(
          jax.random.key(self.config.seed + 1), tokens.shape)
      out = {}
      if self.cfg.num_classes:
        logits, class_logits = model.logits_and_class_logits(tokens, bert)
        out["correct"] = jnp.sum((jnp.argmax(class_logits, -1) == labels) * mask)
        out["examples"] = jnp.sum(mask)
      else:
        logits = model(tokens, bert)
      nll = objectives.token_nll(logits, tokens)
      weights = mask[:, None] * (jnp.ones_like(nll) if bert is None else bert)
      out["nll"], out["tokens"] = jnp.sum(nll * weights), jnp.sum(weights)
      return out

    jitted = jax.jit(fn)

    def call(*args):
      with sharding_lib.activation_sharding(self.mesh, self.rules):
        return jitted(*args)
    return call


def memory_report(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")
  out = {f: int(getattr(m, f, 0) or 0) for f in fields}
  out["per_device_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                             - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
  return out


def evaluate(trainer: Trainer, params, eval_data, centers, config, max_batches: int = 0):
  """Held-out mean NLL (nats/token) and bits/dim; for a finetuning trainer also accuracy."""
  from igpt_jax.data import pipeline
  fn = trainer.eval_fn()
  total = {"nll": 0.0, "tokens": 0.0, "correct": 0.0, "examples": 0.0}
  for i, batch in enumerate(pipeline.eval_batches(
      eval_data, centers, resolution=config.data.resolution,
      batch_size=trainer.train_cfg.batch_size, process_index=jax.process_index(),
      process_count=jax.process_count())):
    if max_batches and i >= max_batches:
      break
    g = sharding_lib.global_batch({k: batch[k] for k in ("tokens", "labels", "mask")},
                                  trainer.mesh, trainer.rules)
    for key, value in fn(params, g["tokens"], g["labels"], g["mask"]).items():
      total[key] += float(value)
  nats = total["nll"] / max(total["tokens"], 1.0)
  out = {"eval_loss": nats, "eval_bits_per_dim": objectives.bits_per_dim(nats, config.data.channels)}
  if trainer.stage == "finetune":
    out["eval_accuracy"] = total["correct"] / max(total["examples"], 1.0)
  return out


def checkpoint_meta(config, cfg: model_lib.ModelConfig, centers) -> dict:
  return {"config": config.to_dict(), "model": dataclasses.asdict(cfg),
          "palette": np.asarray(centers).tolist()}


def pretrain(config, workdir: str, log=print, stop_after: int | None = None) -> dict:
  return fit(config, workdir, "pretrain", log=log, stop_after=stop_after)


def finetune(config, workdir: str, log=print, stop_after: int | None = None) -> dict:
  return fit(config, workdir, "finetune", log=log, stop_after=stop_after)


def fit(config, workdir: str, stage: str, log=print, stop_after: int | None = None) -> dict:
  """The training loop of both stages; resumes from the newest readable checkpoint.

  Pretraining starts from a fresh init; fine-tuning from the pretraining checkpoint's
  parameters plus a zero class head. `stop_after` ends this run at that step with a
  checkpoint, as a preemption would, without changing the schedule (set by the step count).
  """
  from igpt_jax import palette as palette_lib
  from igpt_jax.data import pipeline, sources

  sharding_lib.maybe_initialize_distributed()
  if stage == "pretrain":
    centers = _load_or_fit_palette(config, workdir, log)
  else:
    centers = load_palette(config, workdir)
  data = sources.load(config, "pretrain" if stage == "pretrain" else "train", log=log)
  eval_data = sources.load(config, "test", log=log)
  palette_lib.Palette(centers).check_channels(data.images.shape[-1])
  cfg = model_lib.ModelConfig.from_config(config)
  if stage == "pretrain" and cfg.num_classes:
    raise ValueError("Pretraining takes model.num_classes=0; the class head belongs to finetune.")
  if stage == "finetune":
    if data.num_classes < 2:
      raise ValueError(f"Fine-tuning needs labelled data; {data.name} has no classes.")
    cfg = dataclasses.replace(cfg, num_classes=data.num_classes)

  mesh = sharding_lib.make_mesh(config.mesh)
  trainer = Trainer(cfg, config, mesh, sharding_lib.rules_from_config(config), stage=stage)
  tcfg = trainer.train_cfg
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints", stage),
                                     keep=config.checkpoint.keep)
  restored = ckpt.restore_latest(
      trainer.abstract_state, check_meta=lambda meta: _check_same_model(meta, cfg, ckpt.directory),
      log=log)
  if restored is not None:
    start, state, _ = restored
    log(f"Resumed from checkpoint step {start} in {ckpt.directory}.")
  else:
    start, state = 0, trainer.init_state(config.seed)
    if stage == "finetune":
      _, pretrained, _, _ = load_pretrained(config, workdir, mesh, log=log)
      pretrained["class_head"] = state["params"]["class_head"]  # zero-initialised, as released
      state["params"] = jax.device_put(pretrained, trainer.state_shardings["params"])
    log(f"{stage}: {model_lib.count_params(cfg):,} parameters on mesh {dict(mesh.shape)}.")

  metrics_dir = workdir if stage == "pretrain" else os.path.join(workdir, stage)
  os.makedirs(metrics_dir, exist_ok=True)
  writer = metrics_lib.MetricsWriter(metrics_dir, enabled=jax.process_index() == 0)
  writer.truncate_after(start)
  step_fn = trainer.compile_step()
  mem = memory_report(step_fn)
  if mem:
    log(f"Train step compiled: {mem['per_device_bytes'] / 2**20:.1f} MiB per device.")

  total = tcfg.steps
  batches = pipeline.train_batches(
      data, centers, resolution=config.data.resolution, batch_size=tcfg.batch_size,
      seed=config.seed, start_step=start, num_steps=max(total - start, 0),
      process_index=jax.process_index(), process_count=jax.process_count(),
      augment=config.data.augment, crop_min=config.data.crop_min, log=log)

  stop = {"signal": None}
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
  progress = metrics_lib.Progress(total, start, log=log)
  flops_per_token = model_lib.flops_per_token(cfg)
  device_kind = jax.devices()[0].device_kind
  tokens_per_step = tcfg.batch_size * cfg.seq_len
  last_log_time, last_log_step = time.perf_counter(), start
  step, summary = start, {}
  try:
    for step in range(start + 1, total + 1):
      local = next(batches)
      state, out = step_fn(state, sharding_lib.global_batch(
          {k: local[k] for k in trainer.batch_keys()}, mesh, trainer.rules))
      is_last = step == total
      if step % tcfg.log_every == 0 or is_last:
        loss = float(out["loss"])
        if not math.isfinite(loss):
          raise NonFiniteLoss(
              f"Loss became {loss} at step {step}; the last good checkpoint "
              f"(step {ckpt.all_steps()[-1] if ckpt.all_steps() else 'none'}) is kept. Lower "
              "the learning rate or lengthen the warmup, then rerun to resume from it.")
        now = time.perf_counter()
        tokens_per_s = tokens_per_step * (step - last_log_step) / max(now - last_log_time, 1e-9)
        last_log_time, last_log_step = now, step
        scalars = {"loss": loss, "bits_per_dim": objectives.bits_per_dim(
                       float(out.get("gen_loss", loss)), config.data.channels),
                   **{k: float(out[k]) for k in ("grad_norm", "lr", "clf_loss", "accuracy") if k in out},
                   "tokens_per_s": tokens_per_s,
                   "mfu": metrics_lib.mfu(tokens_per_s, flops_per_token, device_kind, len(jax.devices()))}
        if tcfg.eval_every and (step % tcfg.eval_every == 0 or is_last):
          scalars.update(evaluate(trainer, state["params"], eval_data, centers, config,
                                  tcfg.eval_batches))
        writer.write(step, scalars)
        progress.update(step, scalars)
        summary = scalars
      if (stage == "pretrain" and cfg.causal and tcfg.sample_every
          and (step % tcfg.sample_every == 0 or is_last)):
        writer.write_image(step, "samples", _sample_grid(trainer, state["params"], centers, config,
                                                         step))
      preempted = (stop["signal"] is not None or step == stop_after
                   or _reached_preemption(step))
      if step % config.checkpoint.every == 0 or is_last or preempted:
        if not math.isfinite(float(out["loss"])):
          raise NonFiniteLoss(f"Loss became non-finite at step {step}; not saving it. The last "
                              "good checkpoint is kept.")
        ckpt.save(step, state, checkpoint_meta(config, cfg, centers))
      if preempted:
        log(f"Stopping early: saved step {step}, exiting cleanly." if step == stop_after else
            f"Preemption signal: saved step {step}, exiting cleanly.")
        break
  finally:
    signal.signal(signal.SIGTERM, previous)
    progress.close()
    writer.close()
    ckpt.close()
  return {"stage": stage, "step": step, "checkpoints": ckpt.directory, "metrics": writer.path,
          **{k: v for k, v in summary.items() if v is not None}}


def _sample_grid(trainer: Trainer, params, centers, config, step: int) -> np.ndarray:
  """8 unconditional samples from the current (sharded) parameters, as one uint8 image row.

  Every process takes part (the sampling loop is one jitted program over the mesh)."""
  from jax.experimental import multihost_utils

  from igpt_jax import palette as palette_lib
  from igpt_jax import sample as sample_lib
  model = nnx.merge(trainer.graphdef, params)
  with sharding_lib.activation_sharding(trainer.mesh, trainer.rules):
    tokens = sample_lib.generate(model, 8, jax.random.fold_in(jax.random.key(config.seed), step))
  tokens = multihost_utils.process_allgather(tokens, tiled=True)
  res = config.data.resolution
  images = palette_lib.dequantize(np.asarray(tokens), centers).reshape(-1, res, res,
                                                                      centers.shape[1])
  return sample_lib.image_grid([images])


def load_palette(config, workdir: str) -> np.ndarray:
  from igpt_jax import palette as palette_lib
  return palette_lib.Palette.load(config.palette.path or
                                  os.path.join(workdir, palette_lib.PALETTE_FILE)).centers


def load_pretrained(config, workdir: str, mesh=None, log=print):
  """Stage hand-off: (ModelConfig, params, centers, step) from the newest readable pretraining
  step.

  Refuses, in one sentence, a checkpoint whose model shape or palette differs from the config.
  """
  import ml_collections
  directory = os.path.join(workdir, "checkpoints", "pretrain")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"No pretraining checkpoint in {directory}: run the pretrain stage "
                            "first (or point --workdir at a run that has one).")
  cfg = model_lib.ModelConfig.from_config(config)
  centers = load_palette(config, workdir)

  def check(meta):
    _check_same_model(meta, cfg, directory)
    saved = np.asarray(meta["palette"], np.float32)
    if saved.shape != centers.shape or not np.allclose(saved, centers, atol=1e-6):
      raise ValueError(f"The checkpoint in {directory} was trained with a different palette "
                       f"({saved.shape[0]} colours) than the configured one: use the palette.npz "
                       "it was trained with.")

  ckpt = checkpoint_lib.Checkpointer(directory)
  mesh = mesh or sharding_lib.make_mesh(config.mesh)
  steps = ckpt.all_steps()
  if not steps:
    raise FileNotFoundError(f"No pretraining checkpoint in {directory}: run the pretrain stage first.")
  saved_config = ml_collections.ConfigDict(ckpt.read_meta(steps[-1])["config"])
  trainer = Trainer(cfg, saved_config, mesh, sharding_lib.rules_from_config(config))
  restored = ckpt.restore_latest(trainer.abstract_state, check_meta=check, log=log)
  ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"No readable pretraining checkpoint in {directory}.")
  step, state, _ = restored
  log(f"Loaded pretrained parameters from step {step} of {directory}.")
  return cfg, state["params"], centers, step


def pretrained_model(config, workdir: str, log=print):
  """(model, centers, step): the pretrained ImageGPT ready to call, for probe and sample."""
  cfg, params, centers, step = load_pretrained(config, workdir, log=log)
  graphdef = nnx.graphdef(model_lib.abstract_model(cfg))
  return nnx.merge(graphdef, params), centers, step


def evaluate_stage(config, workdir: str, log=print) -> dict:
  """Stage evaluate: bits/dim of the pretrained model on the whole test split."""
  import json
  from igpt_jax.data import sources
  cfg, params, centers, step = load_pretrained(config, workdir, log=log)
  mesh = sharding_lib.make_mesh(config.mesh)
  trainer = Trainer(cfg, config, mesh, sharding_lib.rules_from_config(config))
  test = sources.load(config, "test", log=log)
  result = {"stage": "evaluate", "checkpoint_step": step, "examples": len(test),
            **evaluate(trainer, params, test, centers, config)}
  path = os.path.join(workdir, "evaluate.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  log(f"Test bits/dim {result['eval_bits_per_dim']:.4f} ({result['eval_loss']:.4f} nats/token); "
      f"written to {path}")
  return result


def _reached_preemption(step: int) -> bool:
  """JAX's preemption sync point: every host agrees on the step at which to save."""
  if jax.process_count() == 1:
    return False
  from jax.experimental import multihost_utils
  try:
    return multihost_utils.reached_preemption_sync_point(step)
  except Exception:  # noqa: BLE001 - no preemption service configured
    return False


def _check_same_model(meta: dict, cfg: model_lib.ModelConfig, where: str) -> None:
  saved = meta.get("model", {})
  shape_keys = ("num_layers", "d_model", "num_heads", "mlp_ratio", "vocab_size", "seq_len",
                "objective", "use_bias")
  diff = {k: (saved.get(k), getattr(cfg, k)) for k in shape_keys if saved.get(k) != getattr(cfg, k)}
  if diff:
    raise ValueError(f"The checkpoint in {where} is a different model: "
                     + ", ".join(f"{k} saved {a} vs configured {b}" for k, (a, b) in diff.items())
                     + ". Use another --workdir or match the config.")


def _load_or_fit_palette(config, workdir: str, log) -> np.ndarray:
  from igpt_jax import palette as palette_lib
  path = config.palette.path or os.path.join(workdir, palette_lib.PALETTE_FILE)
  if not os.path.exists(path) and not config.palette.path:
    log(f"No palette at {path}; fitting one first (stage fit_palette).")
    palette_lib.fit_stage(config, workdir, log=log)
  palette = palette_lib.Palette.load(path)
  if palette.k != config.palette.k:
    raise ValueError(f"The palette at {path} has k={palette.k} but palette.k={config.palette.k}; "
                     "refit it or set palette.k to match.")
  return palette.centers
