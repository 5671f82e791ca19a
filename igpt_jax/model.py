"""The Image GPT decoder, as OpenAI's release (openai/image-gpt, src/model.py) defines it.

Differences from textbook GPT-2 that parity with the released weights depends on:
  * the "layer norm" is RMS-style, x * rsqrt(mean(x^2) + eps) * g: no centring, no bias;
  * the MLP activation is x * sigmoid(1.702 x) ("quick gelu");
  * projections have no biases (`use_bias=True` exists so transformers checkpoints, whose
    Conv1D layers carry biases, convert exactly);
  * input and output embeddings are untied, and the output head starts at zero;
  * the start of sequence is a learned vector `sos`, not a row of the output vocabulary.

Layers are stacked on a leading `layers` axis and run with `jax.lax.scan`, so compile time does
not grow with depth. Every parameter carries logical axis names (see `sharding.py`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from igpt_jax import attention as attention_lib
from igpt_jax.attention import attention
from igpt_jax import config as config_lib
from igpt_jax import remat
from igpt_jax.sharding import constrain

# Logical axis names used by parameters and activations; `sharding.py` maps them to mesh axes.
LAYERS, EMBED, HEADS, HEAD_DIM, MLP, VOCAB, POSITIONS, CLASSES = (
    "layers", "embed", "heads", "head_dim", "mlp", "vocab", "positions", "classes")
BATCH = "batch"  # activations only
RESIDUAL = (BATCH, None, None)  # [B, T, D]: split by batch, whole along the sequence and width

QKV_NAMES = (attention_lib.QUERY, attention_lib.KEY, attention_lib.VALUE)  # checkpoint names


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of one ImageGPT; hashable, so it can be a static jit argument."""
  num_layers: int = 2
  d_model: int = 64
  num_heads: int = 2
  mlp_ratio: float = 4.0
  vocab_size: int = 512  # palette size; the start token is a separate vector
  seq_len: int = 1024  # resolution ** 2
  objective: str = "ar"
  use_bias: bool = False
  norm_eps: float = 1e-5
  num_classes: int = 0  # > 0 adds the fine-tuning class head
  # The class head's bias. OpenAI's release (`wclf`) and transformers' classifier (`score`)
  # have none; fine-tuning sets it from finetune.head_bias (checkpoints from before: True).
  class_bias: bool = True
  dtype: str = "float32"  # compute dtype; parameters stay float32
  attention: str = "auto"  # attention.py: auto | xla | blocked | splash | cudnn
  splash_block_q: int = 512  # splash tiles, tokens (capped at seq_len)
  splash_block_kv: int = 512
  remat: str = "none"  # 'none' | 'full' | a jax.checkpoint_policies name | 'save:NAME,...'
  fused_qkv: bool = False  # one [3, d, H, K] projection instead of three; same parameters
  scan_layers: bool = True  # False unrolls the layer loop (longer compiles, no scan overhead)

  def __post_init__(self):
    problem = config_lib.model_problem(dataclasses.asdict(self))  # the one check of these
    if problem:
      raise ValueError(problem)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  def attention_on(self, platform: str) -> str:
    """The attention implementation that runs on `platform` ('auto' resolved), for logs."""
    return attention_lib.describe(self.attention, platform, self.dtype, self.seq_len,
                                  self.splash_blocks)

  @property
  def splash_blocks(self) -> attention_lib.SplashBlocks:
    return attention_lib.SplashBlocks(self.splash_block_q, self.splash_block_kv)

  @property
  def mlp_dim(self) -> int:
    return int(round(self.d_model * self.mlp_ratio))

  @property
  def causal(self) -> bool:
    return self.objective == "ar"

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @classmethod
  def from_config(cls, config) -> "ModelConfig":
    """Builds the model shape from a full ml_collections run config."""
    return cls(**config_lib.model_fields(config))


def _param(rngs: nnx.Rngs, init, shape, names) -> nnx.Param:
  # eager_sharding=False: shardings are applied explicitly by jit (sharding.py), so building
  # a model never needs a mesh in scope.
  return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=names,
                   eager_sharding=False)


def _whole(table):
  """The token table gathered whole (vocab x d: small) before a lookup. Looked up while split
  along `embed` by FSDP, the result is split that way too, and the backward pass must move the
  batch-split gradient back to that layout, which XLA does by replicating it on every device
  ("involuntary full rematerialization"). The position table needs no such step (its lookup
  is a slice, the TPU compiler counts 5% more HBM bytes for iGPT-L if it is gathered too)."""
  return constrain(table, (None, None))


def rms_norm(x, gain=None, eps=1e-5):
  """The release's `norm`: no mean subtraction, no bias; statistics in float32."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  if gain is not None:
    y = y * gain
  return y.astype(x.dtype)


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


class Block(nnx.Module):
  """One pre-norm transformer block: x + attn(norm(x)); x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, h, k, f = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    qkv_init = nnx.initializers.normal(1.0 / math.sqrt(d))
    out_init = nnx.initializers.normal(1.0 / math.sqrt(d * cfg.num_layers))
    mlp_init = nnx.initializers.normal(0.02)
    ones, zeros = nnx.initializers.ones, nnx.initializers.zeros
    self.ln_1 = _param(rngs, ones, (d,), (EMBED,))
    self.q = _param(rngs, qkv_init, (d, h, k), (EMBED, HEADS, HEAD_DIM))
    self.k = _param(rngs, qkv_init, (d, h, k), (EMBED, HEADS, HEAD_DIM))
    self.v = _param(rngs, qkv_init, (d, h, k), (EMBED, HEADS, HEAD_DIM))
    self.attn_out = _param(rngs, out_init, (h, k, d), (HEADS, HEAD_DIM, EMBED))
    self.ln_2 = _param(rngs, ones, (d,), (EMBED,))
    self.fc = _param(rngs, mlp_init, (d, f), (EMBED, MLP))
    self.fc_out = _param(rngs, mlp_init, (f, d), (MLP, EMBED))
    if cfg.use_bias:
      self.q_bias = _param(rngs, zeros, (h, k), (HEADS, HEAD_DIM))
      self.k_bias = _param(rngs, zeros, (h, k), (HEADS, HEAD_DIM))
      self.v_bias = _param(rngs, zeros, (h, k), (HEADS, HEAD_DIM))
      self.attn_out_bias = _param(rngs, zeros, (d,), (EMBED,))
      self.fc_bias = _param(rngs, zeros, (f,), (MLP,))
      self.fc_out_bias = _param(rngs, zeros, (d,), (EMBED,))
    self.cfg = cfg

  def _bias(self, name, dtype):
    return getattr(self, name)[...].astype(dtype) if self.cfg.use_bias else 0

  def qkv(self, x):
    """Projects the normed input to queries, keys and values, [B, T, H, K] each."""
    dt = self.cfg.compute_dtype
    y = rms_norm(x, self.ln_1[...], self.cfg.norm_eps).astype(dt)
    if self.cfg.fused_qkv:
      # Stacked on a new leading axis (not concatenated over heads), so a head-sharded mesh
      # keeps its layout; the checkpoint still holds q, k, v apart.
      w = jnp.stack([self.q[...], self.k[...], self.v[...]]).astype(dt)
      out = jnp.einsum("btd,sdhk->sbthk", y, w)
      if self.cfg.use_bias:
        out = out + jnp.stack([self.q_bias[...], self.k_bias[...], self.v_bias[...]]
                              ).astype(dt)[:, None, None]
      return tuple(checkpoint_name(constrain(out[i], (BATCH, None, HEADS, None)), name)
                   for i, name in enumerate(QKV_NAMES))
    def proj(w, b, name):
      out = jnp.einsum("btd,dhk->bthk", y, w[...].astype(dt)) + self._bias(b, dt)
      return checkpoint_name(constrain(out, (BATCH, None, HEADS, None)), name)
    return (proj(self.q, "q_bias", QKV_NAMES[0]), proj(self.k, "k_bias", QKV_NAMES[1]),
            proj(self.v, "v_bias", QKV_NAMES[2]))

  def finish(self, x, attended):
    """Output projection, residual, then the MLP half of the block."""
    dt = self.cfg.compute_dtype
    x = x + (jnp.einsum("bthk,hkd->btd", attended, self.attn_out[...].astype(dt))
             + self._bias("attn_out_bias", dt))
    x = constrain(x, RESIDUAL)
    y = rms_norm(x, self.ln_2[...], self.cfg.norm_eps).astype(dt)
    y = quick_gelu(y @ self.fc[...].astype(dt) + self._bias("fc_bias", dt))
    y = checkpoint_name(constrain(y, (BATCH, None, MLP)), attention_lib.MLP_HIDDEN)
    return constrain(x + (y @ self.fc_out[...].astype(dt) + self._bias("fc_out_bias", dt)), RESIDUAL)

  def __call__(self, x):
    q, k, v = self.qkv(x)
    return self.finish(x, attention(q, k, v, causal=self.cfg.causal, impl=self.cfg.attention,
                                    splash_blocks=self.cfg.splash_blocks))


class ImageGPT(nnx.Module):
  """GPT-2 over palette tokens. Inputs are pixel tokens [B, N] in raster order, no start token.

  Autoregressive (`objective='ar'`): position i sees the start vector and tokens[:i], and its
  logits predict tokens[i]. BERT (`objective='bert'`): no start vector, no causal mask; the
  embeddings of masked positions are zeroed, as in the release.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, v = cfg.d_model, cfg.vocab_size
    self.cfg = cfg
    self.wte = _param(rngs, nnx.initializers.normal(0.02), (v, d), (VOCAB, EMBED))
    self.wpe = _param(rngs, nnx.initializers.normal(0.01), (cfg.seq_len, d), (POSITIONS, EMBED))
    if cfg.causal:
      self.sos = _param(rngs, nnx.initializers.normal(0.02), (d,), (EMBED,))

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS})
    def make_blocks(rngs):
      return Block(cfg, rngs)

    self.blocks = make_blocks(rngs)
    self.ln_f = _param(rngs, nnx.initializers.ones, (d,), (EMBED,))
    self.head = _param(rngs, nnx.initializers.zeros, (v, d), (VOCAB, EMBED))
    if cfg.num_classes:
      self.class_head = _param(rngs, nnx.initializers.zeros, (cfg.num_classes, d),
                               (CLASSES, EMBED))
      if cfg.class_bias:
        self.class_bias = _param(rngs, nnx.initializers.zeros, (cfg.num_classes,), (CLASSES,))
      # The head reads standardised features, (pooled - shift) * scale: a probe's own
      # coordinates, where Adam's per-weight steps are well conditioned (pooled features are
      # uncentred: a step on every weight moves every logit the same way). Set once, from the
      # probe that initialises the head (head.py); never trained (no gradient reaches them).
      self.class_shift = _param(rngs, nnx.initializers.zeros, (d,), (EMBED,))
      self.class_scale = _param(rngs, nnx.initializers.ones, (d,), (EMBED,))

  # -- embeddings ----------------------------------------------------------------------------

  def embed_inputs(self, input_ids, positions):
    """Embeds already-shifted inputs: id == vocab_size stands for the start vector.

    This is the Hugging Face convention ([sos] + tokens[:-1]); the decode path uses it.
    """
    wte = self.wte[...]
    if self.cfg.causal:
      wte = jnp.concatenate([wte, self.sos[...][None]], axis=0)
    h = (jnp.take(_whole(wte), input_ids, axis=0)
         + jnp.take(self.wpe[...], positions, axis=0))
    return h.astype(self.cfg.compute_dtype)

  def embed(self, tokens, bert_mask=None):
    """Embeds pixel tokens [B, N]: shifted behind the start vector (AR) or masked (BERT)."""
    n = tokens.shape[1]
    if self.cfg.causal:
      if bert_mask is not None:
        raise ValueError("bert_mask is only meaningful for objective='bert'.")
      sos = jnp.full((tokens.shape[0], 1), self.cfg.vocab_size, tokens.dtype)
      return self.embed_inputs(jnp.concatenate([sos, tokens[:, :-1]], axis=1), jnp.arange(n))
    h = jnp.take(_whole(self.wte[...]), tokens, axis=0)
    if bert_mask is not None:
      h = h * (1.0 - bert_mask.astype(h.dtype))[..., None]
    return (h + self.wpe[...][:n]).astype(self.cfg.compute_dtype)

  # -- trunk ---------------------------------------------------------------------------------

  def _run_blocks(self, h, collect_features: bool):
    """Scans the stacked blocks; optionally also returns f_l for every layer, [L, B, D]."""
    graphdef, stacked = nnx.split(self.blocks)
    eps = self.cfg.norm_eps
    h = constrain(h, RESIDUAL)

    def body(x, layer_state):
      x = nnx.merge(graphdef, layer_state)(x)
      feats = jnp.mean(rms_norm(x, None, eps).astype(jnp.float32), axis=1) if collect_features else None
      return x, feats

    body = remat.wrap(body, self.cfg.remat, self.cfg.scan_layers)
    if self.cfg.scan_layers:
      return jax.lax.scan(body, h, stacked)
    feats = []
    for i in range(self.cfg.num_layers):
      h, f = body(h, jax.tree.map(lambda x: x[i], stacked))
      feats.append(f)
    return h, (jnp.stack(feats) if collect_features else None)

  def logits(self, h):
    """Final norm and output head; logits are float32 for the loss."""
    y = rms_norm(h, self.ln_f[...], self.cfg.norm_eps)
    return jnp.einsum("btd,vd->btv", y, self.head[...].astype(y.dtype),
                      preferred_element_type=jnp.float32)

  def __call__(self, tokens, bert_mask=None):
    """Next-token (AR) or masked-token (BERT) logits over the palette, [B, N, vocab]."""
    h, _ = self._run_blocks(self.embed(tokens, bert_mask), collect_features=False)
    return self.logits(h)

  def features(self, tokens, bert_mask=None):
    """The paper's probe features for every layer in one pass: f_l = mean_i norm(h_l)_i.

    Returns [num_layers, B, d_model] float32; layer l (0-based) is the output of block l + 1.
    The norm carries no gain: the probe standardises each feature, which removes any per-feature
    scale a gain would add.
    """
    _, feats = self._run_blocks(self.embed(tokens, bert_mask), collect_features=True)
    return feats

  def _pool(self, h):
    """What the class head reads: the final norm's output, mean over positions, float32."""
    return jnp.mean(rms_norm(h, self.ln_f[...], self.cfg.norm_eps).astype(jnp.float32), axis=1)

  def pooled(self, tokens, bert_mask=None):
    """[B, d_model]: the class head's input alone (a probe fitted on it initialises the head)."""
    h, _ = self._run_blocks(self.embed(tokens, bert_mask), collect_features=False)
    return self._pool(h)

  def logits_and_class_logits(self, tokens, bert_mask=None):
    """Generative logits and class logits (mean-pooled final norm -> linear, + bias if the
    head has one), for fine-tuning."""
    if not self.cfg.num_classes:
      raise ValueError("This model has no class head: set model.num_classes > 0.")
    h, _ = self._run_blocks(self.embed(tokens, bert_mask), collect_features=False)
    shift, scale = (jax.lax.stop_gradient(v[...]) for v in (self.class_shift, self.class_scale))
    standardised = (self._pool(h) - shift) * scale
    class_logits = standardised @ self.class_head[...].T
    if self.cfg.class_bias:
      class_logits = class_logits + self.class_bias[...]
    return self.logits(h), class_logits

  # -- cached decoding -----------------------------------------------------------------------

  def init_cache(self, batch_size: int, dtype=None) -> dict[str, Any]:
    """A preallocated key/value cache for the whole sequence, [L, B, N, H, K] each."""
    cfg = self.cfg
    if not cfg.causal:
      raise ValueError("Cached decoding needs the autoregressive objective.")
    shape = (cfg.num_layers, batch_size, cfg.seq_len, cfg.num_heads, cfg.head_dim)
    dtype = dtype or cfg.compute_dtype
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

  def decode(self, input_ids, cache, index):
    """Runs T inputs at positions index .. index+T-1 against the cache.

    input_ids: [B, T] shifted inputs (vocab_size = start vector); index: scalar int (traced ok).
    Returns (logits [B, T, vocab] float32, updated cache). T = prefix length fills a cache in
    one pass; T = 1 is one sampling step.
    """
    positions = index + jnp.arange(input_ids.shape[1])
    h = self.embed_inputs(input_ids, positions)
    graphdef, stacked = nnx.split(self.blocks)

    def body(x, layer):
      layer_state, k_cache, v_cache = layer
      block = nnx.merge(graphdef, layer_state)
      q, k, v = block.qkv(x)
      k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), index, 1)
      v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), index, 1)
      attended = attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), causal=True,
                           q_offset=index)
      return block.finish(x, attended), (k_cache, v_cache)

    h, (k_new, v_new) = jax.lax.scan(body, h, (stacked, cache["k"], cache["v"]))
    return self.logits(h), {"k": k_new, "v": v_new}

  # Sampling reads the whole cache for every token, so decoding is bound by memory reads. The
  # chunked cache keeps each layer's keys and values as separate [B, H, chunk, K] buffers: a step
  # updates one buffer in place and reads only the chunks filled so far, with no slicing copies
  # (a scanned [L, ...] cache is copied whole per token on CPUs), about half the bytes of a
  # full-length cache on average.

  def chunk_cache(self, cache, chunk: int) -> dict[str, list]:
    """[L, B, N, H, K] cache (from `decode`) -> per layer, per chunk: [B, H, chunk, K] buffers."""
    n = self.cfg.seq_len
    if n % chunk:
      raise ValueError(f"seq_len={n} is not divisible by the cache chunk {chunk}.")
    def split(x):
      x = jnp.swapaxes(x, 2, 3)  # [L, B, H, N, K]
      return [[x[l, :, :, c:c + chunk] for c in range(0, n, chunk)] for l in range(x.shape[0])]
    return {"k": split(cache["k"]), "v": split(cache["v"])}

  def unstacked_blocks(self) -> list[Block]:
    """The stacked blocks as one Block per layer (each a slice of the stacked parameters)."""
    graphdef, stacked = nnx.split(self.blocks)
    return [nnx.merge(graphdef, jax.tree.map(lambda x: x[l], stacked))
            for l in range(self.cfg.num_layers)]

  def decode_step(self, input_ids, cache, index, upto: int, blocks: list[Block] | None = None):
    """One position ([B, 1] shifted inputs at scalar `index`) against a chunked cache.

    `upto` (static) is the chunk holding `index`: chunks 0..upto are read, chunk `upto` is
    written. Layers are unrolled so every buffer is its own loop variable, updated in place.
    `blocks` (from `unstacked_blocks`, made once outside the sampling loop) saves slicing the
    parameters at every step. Returns (logits [B, 1, vocab] float32, updated cache).
    """
    chunk = self.cfg.seq_len // len(cache["k"][0])
    h = self.embed_inputs(input_ids, index + jnp.arange(1))
    blocks = blocks or self.unstacked_blocks()
    key_pos = upto * chunk + jnp.arange(chunk)
    new_k, new_v = [], []
    for block, k_chunks, v_chunks in zip(blocks, cache["k"], cache["v"]):
      q, k, v = block.qkv(h)
      offset = index - upto * chunk
      k_chunks, v_chunks = list(k_chunks), list(v_chunks)
      for chunks, new in ((k_chunks, k), (v_chunks, v)):
        chunks[upto] = jax.lax.dynamic_update_slice_in_dim(
            chunks[upto], jnp.swapaxes(new, 1, 2).astype(chunks[upto].dtype), offset, 2)
      qh = q[:, 0].astype(jnp.float32) * (self.cfg.head_dim ** -0.5)  # [B, H, K]
      scores = [jnp.einsum("bhk,bhsk->bhs", qh, kc.astype(jnp.float32))
                for kc in k_chunks[:upto + 1]]
      scores[upto] = jnp.where(key_pos <= index, scores[upto], -1e10)
      probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
      attended = sum(jnp.einsum("bhs,bhsk->bhk", probs[..., j * chunk:(j + 1) * chunk],
                                vc.astype(jnp.float32))
                     for j, vc in enumerate(v_chunks[:upto + 1]))
      h = block.finish(h, attended[:, None].astype(h.dtype))
      new_k.append(k_chunks)
      new_v.append(v_chunks)
    return self.logits(h), {"k": new_k, "v": new_v}


def abstract_model(cfg: ModelConfig) -> ImageGPT:
  """The model with ShapeDtypeStructs for arrays: shapes and shardings, nothing allocated."""
  return nnx.eval_shape(lambda: ImageGPT(cfg, rngs=nnx.Rngs(0)))


def count_params(cfg: ModelConfig) -> int:
  """Exact parameter count, computed without allocating any parameter."""
  state = nnx.state(abstract_model(cfg), nnx.Param)
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(state)))


def flops_per_token(cfg: ModelConfig) -> int:
  """Training FLOPs per token: 6 * N_matmul + the attention term.

  Convention: N_matmul counts the parameters that take part in a matrix multiply per token
  (attention q/k/v/out, MLP, output head; not the embedding gathers, norms or biases); forward
  is 2 FLOPs per such parameter and backward twice that, hence 6 N_matmul. Attention scores
  and the weighted sum cost 2 * 2 * d * T per layer and token forward over a context of T;
  with the causal mask only half the keys count on average, so the attention term is
  6 * L * d * T for AR (3x forward for forward + backward) and 12 * L * d * T for BERT.
  """
  d, layers, t = cfg.d_model, cfg.num_layers, cfg.seq_len
  n_matmul = layers * (4 * d * d + 2 * d * cfg.mlp_dim) + cfg.vocab_size * d
  attn = (6 if cfg.causal else 12) * layers * d * t
  return 6 * n_matmul + attn
