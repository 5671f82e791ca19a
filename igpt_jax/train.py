"""The train state and the one functional train step under `jax.jit` with explicit shardings
(the loop around it is loop.py).

The train state is a plain pytree {'params', 'opt_state', 'step', 'nonfinite_streak',
'nonfinite_longest'}; the
model's graph definition is split off once and merged back inside the jitted step, so the hot
path never walks Python objects. Everything random is a function of (seed, step): a run resumed
from a checkpoint computes bit-for-bit what an uninterrupted run would have.

A step whose gradients or updates are not finite is not applied: the step counter advances (the
data order stays a function of the step), parameters and optimizer state stay as they were, and
`nonfinite_streak` counts such steps in a row. `nonfinite_longest` keeps the longest streak so
far, so the loop, which looks only at log and save steps, still sees a streak that ended
between two of them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from igpt_jax import model as model_lib
from igpt_jax import objectives
from igpt_jax import optim
from igpt_jax import sharding as sharding_lib
from igpt_jax.config import UserError


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


def head_lr(config) -> float:
  """The class head's peak learning rate: finetune.head_lr, or finetune.lr when it is < 0."""
  return config.finetune.lr if config.finetune.head_lr < 0 else config.finetune.head_lr


def check_batch_split(train_cfg, mesh, rules) -> None:
  """One `error:` line when the mesh cannot split a micro-batch (JAX would raise a 30-line
  IndivisibleError at the first step). The stages call it first, before a palette fit. Both
  stages take their batch size from config.train, so the message names train's fields."""
  if train_cfg.batch_size % train_cfg.accum_steps:
    raise UserError(f"--config.train.batch_size={train_cfg.batch_size} is not divisible by "
                    f"accum_steps={train_cfg.accum_steps}.")
  shards = sharding_lib.batch_shards(mesh, rules)
  micro = train_cfg.batch_size // train_cfg.accum_steps
  if micro % shards:
    raise UserError(
        f"The batch is split over {shards} devices (mesh {dict(mesh.shape)}), but a "
        f"micro-batch has {micro} rows (--config.train.batch_size={train_cfg.batch_size} / "
        f"accum_steps={train_cfg.accum_steps}): make it a multiple of {shards}, or change "
        "--config.mesh.*.")


def check_fits_devices(config, stage: str = "pretrain") -> None:
  """The mesh fits this run's devices and splits its batches: checked before anything slow."""
  mesh = sharding_lib.make_mesh(config.mesh)
  check_batch_split(train_section(config, stage), mesh, sharding_lib.rules_from_config(config))


def ensembled_class_logits(model, tokens, seed: int, masks: int):
  """[B, classes]: a BERT model's class logits averaged over `masks` inputs masked as in
  pretraining (objectives.mask_ensemble)."""
  return objectives.mask_ensemble(lambda m: model.logits_and_class_logits(tokens, m)[1],
                                  tokens.shape, seed, masks)


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
  undivided: str = ""  # sharding.undivided: parameter dimensions the mesh leaves whole

  def __post_init__(self):
    self.train_cfg = train_section(self.config, self.stage)
    abstract = model_lib.abstract_model(self.cfg)
    self.graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    param_shardings = _pure(sharding_lib.shardings_for(abstract_params, self.mesh, self.rules))
    self.undivided = sharding_lib.undivided(abstract_params, self.mesh, self.rules)
    self.tx = optim.make_optimizer(self.train_cfg, head_lr=head_lr(self.config)
                                   if self.stage == "finetune" else None)
    self.abstract_state = jax.eval_shape(self._init_fn, jax.random.key(0))
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    opt_shardings = optax.tree_map_params(
        self.tx, lambda _, s: s, self.abstract_state["opt_state"], param_shardings,
        transform_non_params=lambda _: replicated)
    self.state_shardings = {"params": param_shardings, "opt_state": opt_shardings,
                            "step": replicated, "nonfinite_streak": replicated,
                            "nonfinite_longest": replicated}
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        self.abstract_state, self.state_shardings)
    self.batch_sharding = sharding_lib.batch_sharding(self.mesh, self.rules)

  # -- state ---------------------------------------------------------------------------------

  def _init_fn(self, key):
    model = model_lib.ImageGPT(self.cfg, rngs=nnx.Rngs(key))
    params = _pure(nnx.state(model, nnx.Param))
    return {"params": params, "opt_state": self.tx.init(params),
            "step": jnp.zeros((), jnp.int32), "nonfinite_streak": jnp.zeros((), jnp.int32),
            "nonfinite_longest": jnp.zeros((), jnp.int32)}

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
    factor = optim.schedule(self.train_cfg)(state["step"])  # by the step: see optim.py
    updates = jax.tree.map(lambda u: u * factor.astype(u.dtype), updates)
    grad_norm = optax.tree.norm(grads)
    # The update's norm is not finite iff some update is not (or overflows): one cheap
    # reduction that also catches a finite gradient times a non-finite learning rate.
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {
        "params": keep(optax.apply_updates(state["params"], updates), state["params"]),
        "opt_state": keep(opt_state, state["opt_state"]),
        "step": state["step"] + 1,
        "nonfinite_streak": jnp.where(finite, 0, state["nonfinite_streak"] + 1)}
    new_state["nonfinite_longest"] = jnp.maximum(state["nonfinite_longest"],
                                                 new_state["nonfinite_streak"])
    out = {"loss": loss, "grad_norm": grad_norm, "skipped": 1 - finite.astype(jnp.int32),
           "nonfinite_streak": new_state["nonfinite_streak"],
           "nonfinite_longest": new_state["nonfinite_longest"],
           "lr": self.train_cfg.lr * factor, **aux}  # the trunk's, as applied
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
    check_batch_split(self.train_cfg, self.mesh, self.rules)
    with sharding_lib.activation_sharding(self.mesh, self.rules):
      return self.jit_step().lower(self.abstract_state, self.abstract_batch()).compile()

  def _on_mesh(self, fn):
    """`fn` jitted, called with this trainer's activation sharding rules in scope."""
    jitted = jax.jit(fn)

    def call(*args):
      with sharding_lib.activation_sharding(self.mesh, self.rules):
        return jitted(*args)
    return call

  def _evaluation_mask(self, tokens):
    """A BERT model's inputs at evaluation: masked as in pretraining, one fixed mask (AR: None)."""
    if self.cfg.causal:
      return None
    return objectives.bert_mask(jax.random.key(self.config.seed + 1), tokens.shape)

  @functools.cached_property
  def eval_fn(self):
    """Sums over a padded batch (mask weights examples): NLL, tokens, and for a class head
    correct predictions and examples. Built once per trainer, so evaluating during training
    compiles once."""
    masks = self.config.finetune.bert_masks if self.stage == "finetune" else 0

    def eval_batch(params, tokens, labels, mask):
      model = nnx.merge(self.graphdef, params)
      bert = self._evaluation_mask(tokens)
      out = {}
      if self.cfg.num_classes:
        logits, class_logits = model.logits_and_class_logits(tokens, bert)
        if bert is not None and masks:  # the class logits of `masks` masks, averaged
          class_logits = ensembled_class_logits(model, tokens, self.config.seed + 1, masks)
        out["correct"] = jnp.sum((jnp.argmax(class_logits, -1) == labels) * mask)
        out["examples"] = jnp.sum(mask)
      else:
        logits = model(tokens, bert)
      nll = objectives.token_nll(logits, tokens)
      weights = mask[:, None] * (jnp.ones_like(nll) if bert is None else bert)
      out["nll"], out["tokens"] = jnp.sum(nll * weights), jnp.sum(weights)
      return out

    return self._on_mesh(eval_batch)

  @functools.cached_property
  def predict_fn(self):
    """params, tokens -> [B] predicted classes, from the class logits eval_fn scores."""
    masks = self.config.finetune.bert_masks

    def predict(params, tokens):
      model = nnx.merge(self.graphdef, params)
      bert = self._evaluation_mask(tokens)
      class_logits = model.logits_and_class_logits(tokens, bert)[1]
      if bert is not None and masks:
        class_logits = ensembled_class_logits(model, tokens, self.config.seed + 1, masks)
      return jnp.argmax(class_logits, -1).astype(jnp.int32)

    return self._on_mesh(predict)

  @functools.cached_property
  def pooled_fn(self):
    """params, tokens -> [B, d_model]: what the class head reads (head.py fits a probe on it),
    with the inputs eval_fn gives it (a BERT model's masked as in evaluation)."""
    def pooled(params, tokens):
      bert = self._evaluation_mask(tokens)
      return nnx.merge(self.graphdef, params).pooled(tokens, bert)

    return self._on_mesh(pooled)


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


def abstract_params(cfg: model_lib.ModelConfig, mesh, rules):
  """Shapes and shardings of the parameters alone: the target of a parameters-only restore."""
  _, params = nnx.split(model_lib.abstract_model(cfg), nnx.Param)
  shardings = _pure(sharding_lib.shardings_for(params, mesh, rules))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      _pure(params), shardings)


def init_params(cfg: model_lib.ModelConfig, mesh, rules, seed: int):
  """Freshly initialised parameters, created already sharded (a random-init baseline)."""
  shardings = jax.tree.map(lambda a: a.sharding, abstract_params(cfg, mesh, rules))
  init = lambda key: _pure(nnx.state(model_lib.ImageGPT(cfg, rngs=nnx.Rngs(key)), nnx.Param))
  with sharding_lib.activation_sharding(mesh, rules):
    return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
