"""Sampling: unconditional images and completions of given top halves, through the KV cache.

The whole decode is one jitted `fori_loop` over positions (compiled once, not per token): the
given prefix fills the cache in a single pass, then each step feeds the previous token and
draws the next from softmax(logits / temperature), optionally restricted to the top k.
temperature == 0 is greedy decoding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from igpt_jax import model as model_lib


def _pick(logits, key, temperature: float, top_k: int):
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef", "prefix_len", "temperature", "top_k",
                                             "chunks"))
def _generate(graphdef, params, prefix, key, *, prefix_len: int, temperature: float, top_k: int,
              chunks: int):
  """prefix: [B, prefix_len] given tokens (may be width 0). Returns [B, seq_len] tokens."""
  model = nnx.merge(graphdef, params)
  cfg = model.cfg
  batch = prefix.shape[0]
  sos = jnp.full((batch, 1), cfg.vocab_size, jnp.int32)
  tokens = jnp.zeros((batch, cfg.seq_len), jnp.int32)
  tokens = jax.lax.dynamic_update_slice_in_dim(tokens, prefix.astype(jnp.int32), 0, 1)
  cache = model.init_cache(batch)
  # Prefill: inputs [sos, t0 .. t_{p-1}] at positions 0..p; the last logits predict token p.
  inputs = jnp.concatenate([sos, prefix.astype(jnp.int32)], axis=1)
  logits, cache = model.decode(inputs, cache, 0)
  key, sub = jax.random.split(key)
  tokens = tokens.at[:, prefix_len].set(_pick(logits[:, -1], sub, temperature, top_k))

  chunk = cfg.seq_len // chunks
  cache = model.chunk_cache(cache, chunk)
  blocks = model.unstacked_blocks()  # sliced once, outside the loops

  def body(upto, i, carry):
    tokens, cache, key = carry
    inputs = jax.lax.dynamic_slice_in_dim(tokens, i - 1, 1, 1)
    logits, cache = model.decode_step(inputs, cache, i, upto, blocks)
    key, sub = jax.random.split(key)
    return tokens.at[:, i].set(_pick(logits[:, 0], sub, temperature, top_k)), cache, key

  # One loop per cache chunk: the loop for chunk c reads chunks 0..c only.
  carry = (tokens, cache, key)
  for c in range(chunks):
    start, stop = max(prefix_len + 1, c * chunk), (c + 1) * chunk
    if start < stop:
      carry = jax.lax.fori_loop(start, stop, functools.partial(body, c), carry)
  return carry[0]


def generate(model: model_lib.ImageGPT, batch_size: int, key, prefix=None,
             temperature: float = 1.0, top_k: int = 0, cache_chunks: int = 8):
  """Samples [B, seq_len] tokens; `prefix` [B, P] tokens are kept as given (completions).

  `cache_chunks` splits the key/value cache so that early positions read less of it (faster,
  one more compiled loop per chunk); it falls back to 1 when seq_len is not divisible by it.
  """
  if not model.cfg.causal:
    raise ValueError("Sampling needs an autoregressive (objective='ar') model.")
  if prefix is None:
    prefix = jnp.zeros((batch_size, 0), jnp.int32)
  prefix = jnp.asarray(prefix, jnp.int32)
  if prefix.shape[1] >= model.cfg.seq_len:
    raise ValueError(f"A prefix of {prefix.shape[1]} tokens leaves nothing to sample.")
  graphdef, params = nnx.split(model, nnx.Param)
  chunks = cache_chunks if cache_chunks > 0 and model.cfg.seq_len % cache_chunks == 0 else 1
  return _generate(graphdef, nnx.to_pure_dict(params), prefix, key, prefix_len=prefix.shape[1],
                   temperature=float(temperature), top_k=int(top_k), chunks=chunks)


def greedy_uncached(model: model_lib.ImageGPT, prefix, seq_len: int):
  """Reference: greedy decoding by re-running the full model for every position (slow)."""
  tokens = np.zeros((prefix.shape[0], seq_len), np.int32)
  tokens[:, :prefix.shape[1]] = prefix
  for i in range(prefix.shape[1], seq_len):
    tokens[:, i] = np.asarray(jnp.argmax(model(jnp.asarray(tokens))[:, i], axis=-1))
  return tokens


def image_grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
  """rows: lists of uint8 images [N, H, W, C] -> one uint8 grid image, a row per list."""
  n = max(len(r) for r in rows)
  h, w, c = rows[0].shape[1:]
  grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, c), 255, np.uint8)
  for i, row in enumerate(rows):
    for j, img in enumerate(row):
      y, x = pad + i * (h + pad), pad + j * (w + pad)
      grid[y:y + h, x:x + w] = img
  return grid


def save_png(image: np.ndarray, path, scale: int = 4) -> str:
  """Process 0 writes the PNG (local or remote path); every process gets the path back."""
  import io

  from PIL import Image

  from igpt_jax import distributed
  from igpt_jax import workdir as workdir_lib
  if distributed.is_chief():
    img = image[..., 0] if image.shape[-1] == 1 else image
    pil = Image.fromarray(img)
    png = io.BytesIO()
    pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST).save(png, format="PNG")
    workdir_lib.write_bytes(path, png.getvalue())
  return str(path)


def across_classes(labels, n: int) -> np.ndarray:
  """Indices of n test images taken in turn from each class (each class's first, then each
  class's second, ...), in file order: the first n files of a folder are often one class."""
  labels = np.asarray(labels)
  rank = np.zeros(len(labels), np.int64)  # an image's place among its class's
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    rank[members] = np.arange(len(members))
  return np.sort(np.lexsort((labels, rank))[:n])


def run(config, workdir, log=print) -> dict:
  """Stage sample: unconditional samples and completions of test images' bottom halves.

  Every process runs the sampler (one program over the mesh); process 0 writes the PNGs."""
  from igpt_jax import distributed
  from igpt_jax import palette as palette_lib
  from igpt_jax import workdir as workdir_lib
  from igpt_jax.data import pipeline, sources
  cfg, params, centers, step = workdir_lib.load_pretrained(config, workdir, log=log)
  model = nnx.merge(nnx.graphdef(model_lib.abstract_model(cfg)), params)
  res, sc = config.data.resolution, config.sample
  out_dir = workdir_lib.path(workdir) / "samples"
  key = jax.random.key(config.seed)
  shape = (res, res, centers.shape[1])
  distributed.PREEMPTION.check("sample", checkpoint_step=step)
  log(f"Sampling {sc.num} images (temperature {sc.temperature}, top_k {sc.top_k or 'off'})...")
  uncond = generate(model, sc.num, jax.random.fold_in(key, 0), temperature=sc.temperature,
                    top_k=sc.top_k)
  uncond_imgs = palette_lib.dequantize(distributed.to_host(uncond), centers).reshape(-1, *shape)
  paths = {"unconditional": save_png(image_grid([uncond_imgs]), out_dir / "unconditional.png")}
  distributed.PREEMPTION.check("sample", checkpoint_step=step)  # each decode is one program
  test = sources.load(config, "test", log=log)
  test = test.subset(across_classes(test.labels, sc.completions), "completions")
  tokens, pixels = pipeline.tokens_of(test, centers, res, with_pixels=True,
                                      augment=config.data.augment)
  half = (res // 2) * res
  completed = generate(model, len(tokens), jax.random.fold_in(key, 1), prefix=tokens[:, :half],
                       temperature=sc.temperature, top_k=sc.top_k)
  halves = palette_lib.dequantize(tokens, centers).reshape(-1, *shape).copy()
  halves[:, res // 2:] = 128
  rows = [pixels, halves,
          palette_lib.dequantize(distributed.to_host(completed), centers).reshape(-1, *shape)]
  paths["completions"] = save_png(image_grid(rows), out_dir / "completions.png")
  log(f"Samples written to {out_dir} (rows of completions.png: originals, top halves, completions)")
  return {"stage": "sample", "checkpoint_step": step, **paths}

