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


@dataclasses.dataclass
class Trainer:
  """Everything compiled once for one model shape, optimiser and mesh."""
  cfg: model_lib.ModelConfig
  config: object
  mesh: jax.sharding.Mesh
  rules: tuple
  graphdef: object = None
  tx: object = None
  state_shardings: object = None
  abstract_state: object = None

  def __post_init__(self):
    abstract = model_lib.abstract_model(self.cfg)
    self.graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    param_shardings = _pure(sharding_lib.shardings_for(abstract_params, self.mesh, self.rules))
    self.tx = optim.make_optimizer(self.config.train)
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

  def loss_fn(self, params, tokens, rng):
    model = nnx.merge(self.graphdef, params)
    if self.cfg.causal:
      return objectives.ar_loss(model(tokens), tokens)
    mask = objectives.bert_mask(rng, tokens.shape)
    return objectives.bert_loss(model(tokens, mask), tokens, mask)

  def _step_fn(self, state, batch):
    tokens = batch["tokens"]
    rng = jax.random.fold_in(jax.random.key(self.config.seed), state["step"])
    accum = self.config.train.accum_steps
    grad_fn = jax.value_and_grad(self.loss_fn)
    if accum == 1:
      loss, grads = grad_fn(state["params"], tokens, rng)
    else:
      # Micro-batch i is every accum-th example, so each device keeps its own rows.
      micro = jnp.moveaxis(tokens.reshape(tokens.shape[0] // accum, accum, -1), 1, 0)

      def body(carry, xs):
        i, toks = xs
        loss_i, grads_i = grad_fn(state["params"], toks, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (loss_i, grads_i)), None

      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state["params"]))
      (loss, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
      loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
    out = {"loss": loss, "grad_norm": optax.tree.norm(grads),
           "lr": optim.learning_rate(self.config.train)(state["step"])}
    return new_state, out

  def jit_step(self):
    return jax.jit(self._step_fn, in_shardings=(self.state_shardings, {"tokens": self.batch_sharding}),
                   out_shardings=(self.state_shardings, None), donate_argnums=0)

  def abstract_batch(self):
    shape = (self.config.train.batch_size, self.cfg.seq_len)
    return {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding)}

  def compile_step(self):
    """Ahead-of-time compile; the plan stage and the loop share it."""
    if self.config.train.batch_size % self.config.train.accum_steps:
      raise ValueError(f"train.batch_size={self.config.train.batch_size} is not divisible by "
                       f"train.accum_steps={self.config.train.accum_steps}.")
    with sharding_lib.activation_sharding(self.mesh, self.rules):
      return self.jit_step().lower(self.abstract_state, self.abstract_batch()).compile()

  def eval_fn(self):
    """Sum of per-token NLL and token count over a padded batch (mask weights examples)."""
    def fn(params, tokens, mask):
      model = nnx.merge(self.graphdef, params)
      if self.cfg.causal:
        nll = objectives.token_nll(model(tokens), tokens)
        weights = jnp.broadcast_to(mask[:, None], nll.shape)
      else:
        bert = objectives.bert_mask(jax.random.key(self.config.seed + 1), tokens.shape)
        nll = objectives.token_nll(model(tokens, bert), tokens)
        weights = bert * mask[:, None]
      return jnp.sum(nll * weights), jnp.sum(weights)

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


def evaluate_bits(trainer: Trainer, params, eval_data, centers, config, max_batches: int = 0):
  """Mean NLL (nats/token) and bits/dim on the held-out split."""
  from igpt_jax.data import pipeline
  fn = trainer.eval_fn()
  total, count = 0.0, 0.0
  for i, batch in enumerate(pipeline.eval_batches(
      eval_data, centers, resolution=config.data.resolution, batch_size=config.train.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count())):
    if max_batches and i >= max_batches:
      break
    g = sharding_lib.global_batch({"tokens": batch["tokens"], "mask": batch["mask"]},
                                  trainer.mesh, trainer.rules)
    s, c = fn(params, g["tokens"], g["mask"])
    total, count = total + float(s), count + float(c)
  nats = total / max(count, 1.0)
  return {"eval_loss": nats, "eval_bits_per_dim": objectives.bits_per_dim(nats, config.data.channels)}


def checkpoint_meta(config, cfg: model_lib.ModelConfig, centers) -> dict:
  return {"config": config.to_dict(), "model": dataclasses.asdict(cfg),
          "palette": np.asarray(centers).tolist()}


def pretrain(config, workdir: str, log=print, stop_after: int | None = None) -> dict:
  """The pretraining loop: resumes from the newest readable checkpoint in the workdir.

  `stop_after` ends this run at that step with a checkpoint, as a preemption would, without
  changing the schedule (which depends on train.steps).
  """
  from igpt_jax import palette as palette_lib
  from igpt_jax.data import pipeline, sources

  sharding_lib.maybe_initialize_distributed()
  cfg = model_lib.ModelConfig.from_config(config)
  if cfg.num_classes:
    raise ValueError("Pretraining takes model.num_classes=0; the class head belongs to finetune.")
  centers = _load_or_fit_palette(config, workdir, log)
  data = sources.load(config, "pretrain", log=log)
  eval_data = sources.load(config, "test", log=log)
  palette_lib.Palette(centers).check_channels(data.images.shape[-1])

  mesh = sharding_lib.make_mesh(config.mesh)
  trainer = Trainer(cfg, config, mesh, sharding_lib.rules_from_config(config))
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints", "pretrain"),
                                     keep=config.checkpoint.keep)
  restored = ckpt.restore_latest(
      trainer.abstract_state, check_meta=lambda meta: _check_same_model(meta, cfg, ckpt.directory),
      log=log)
  if restored is None:
    state, start = trainer.init_state(config.seed), 0
    log(f"Initialised {model_lib.count_params(cfg):,} parameters on mesh {dict(mesh.shape)}.")
  else:
    start, state, _ = restored
    log(f"Resumed from checkpoint step {start} in {ckpt.directory}.")

  writer = metrics_lib.MetricsWriter(workdir, enabled=jax.process_index() == 0)
  writer.truncate_after(start)
  step_fn = trainer.compile_step()
  mem = memory_report(step_fn)
  if mem:
    log(f"Train step compiled: {mem['per_device_bytes'] / 2**20:.1f} MiB per device.")

  total = config.train.steps
  batches = pipeline.train_batches(
      data, centers, resolution=config.data.resolution, batch_size=config.train.batch_size,
      seed=config.seed, start_step=start, num_steps=max(total - start, 0),
      process_index=jax.process_index(), process_count=jax.process_count(),
      augment=config.data.augment, crop_min=config.data.crop_min, log=log)

  stop = {"signal": None}
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
  progress = metrics_lib.Progress(total, start, log=log)
  flops_per_token = model_lib.flops_per_token(cfg)
  device_kind = jax.devices()[0].device_kind
  tokens_per_step = config.train.batch_size * cfg.seq_len
  last_log_time, last_log_step = time.perf_counter(), start
  step = start
  summary = {}
  try:
    for step in range(start + 1, total + 1):
      local = next(batches)
      state, out = step_fn(state, sharding_lib.global_batch({"tokens": local["tokens"]}, mesh,
                                                            trainer.rules))
      is_last = step == total
      if step % config.train.log_every == 0 or is_last:
        loss = float(out["loss"])
        if not math.isfinite(loss):
          raise NonFiniteLoss(
              f"Loss became {loss} at step {step}; the last good checkpoint "
              f"(step {ckpt.all_steps()[-1] if ckpt.all_steps() else 'none'}) is kept. Lower "
              "train.lr or raise train.warmup_steps, then rerun to resume from it.")
        now = time.perf_counter()
        tokens_per_s = tokens_per_step * (step - last_log_step) / max(now - last_log_time, 1e-9)
        last_log_time, last_log_step = now, step
        scalars = {"loss": loss, "bits_per_dim": objectives.bits_per_dim(loss, config.data.channels),
                   "grad_norm": float(out["grad_norm"]), "lr": float(out["lr"]),
                   "tokens_per_s": tokens_per_s,
                   "mfu": metrics_lib.mfu(tokens_per_s, flops_per_token, device_kind, len(jax.devices()))}
        if config.train.eval_every and (step % config.train.eval_every == 0 or is_last):
          scalars.update(evaluate_bits(trainer, state["params"], eval_data, centers, config,
                                       config.train.eval_batches))
        writer.write(step, scalars)
        progress.update(step, scalars)
        summary = scalars
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
  return {"stage": "pretrain", "step": step, "checkpoints": ckpt.directory,
          "metrics": writer.path, **{k: v for k, v in summary.items() if v is not None}}


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
