"""Attention implementations, one function over [B, T, H, K] queries, keys and values.

  xla      scores, mask and softmax as plain XLA ops: the whole [B, H, T, T] float32 score matrix
           goes through memory. Every platform; decoding with the KV cache always uses it.
  blocked  causal attention by query blocks, upper blocks never computed (CPUs).
  splash   Pallas splash attention (jax.experimental.pallas.ops.tpu.splash_attention): a fused
           TPU kernel that keeps scores in VMEM and skips blocks the mask hides. It runs inside
           `jax.shard_map` over the mesh in context (batch over the batch axes, heads over the
           heads axis, as the rules say); on a CPU it runs in Pallas's interpreter (tests only).
  cudnn    cuDNN flash attention (GPUs, 16-bit compute).
  auto     the platform's best: splash on TPU, cudnn on GPU at 16-bit (else xla), blocked on CPU.

The platform is read from the mesh the step is traced under (`jax.set_mesh`, as
sharding.activation_sharding does), so `plan` compiling for a TPU slice on a CPU machine gets
the TPU's choice; without a mesh it is JAX's default backend.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from igpt_jax import sharding as sharding_lib
from igpt_jax.config import ATTENTIONS, CHECKPOINT_NAMES, splash_shape_problem

IMPLS = ATTENTIONS
BLOCKED_QUERY_BLOCK = 128  # query block of impl="blocked"

# Checkpoint names on the block's activations (model.py names q/k/v and the MLP hidden), for
# `model.remat=save:NAME,...` policies. ATTENTION_OUT is also the name of splash's residuals
# (its output and log-sum-exp): saving it spares the backward pass a second forward kernel.
QUERY, KEY, VALUE, ATTENTION_OUT, MLP_HIDDEN = CHECKPOINT_NAMES


@dataclasses.dataclass(frozen=True)
class SplashBlocks:
  """Splash tile sizes (tokens); each is capped at the sequence length. Forward and backward
  kernels (dq and dkv apart: the TPU compiler puts splash's fused dq+dkv backward at more HBM
  bytes for iGPT-S) use the same query/key blocks."""
  q: int = 512
  kv: int = 512


def _platform_kind(name: str) -> str:
  return "gpu" if name in ("cuda", "rocm") else name


def platform() -> str:
  """'tpu' | 'gpu' | 'cpu': the platform of the mesh in context, else JAX's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  return _platform_kind(mesh.abstract_device.platform if not mesh.empty
                        else jax.default_backend())


def device_platform(device) -> str:
  """'tpu' | 'gpu' | 'cpu' for a device (compile-only ones included)."""
  return _platform_kind(device.platform)


def mesh_platform(mesh) -> str:
  return device_platform(mesh.devices.flat[0])


def describe(impl: str, on: str, dtype, seq_len: int, blocks: SplashBlocks) -> str:
  """What the log and plan JSON say ran: 'splash', or 'splash (auto on tpu)'."""
  chosen = resolve(impl, on, dtype, seq_len, blocks)
  return chosen if impl != "auto" else f"{chosen} (auto on {on})"


def resolve(impl: str, on: str | None = None, dtype="float32", seq_len: int | None = None,
            blocks: SplashBlocks = SplashBlocks()) -> str:
  """The implementation `impl` stands for on platform `on` (default: `platform()`). `auto` on a
  TPU falls back to xla for a sequence splash cannot tile (under 128 tokens: tiny tests)."""
  if impl != "auto":
    return impl
  on = on or platform()
  if on == "tpu":
    return "splash" if seq_len is None or splash_fits(seq_len, blocks) else "xla"
  if on == "gpu":
    return "cudnn" if jnp.dtype(dtype).itemsize == 2 else "xla"
  return "blocked"


def splash_fits(seq_len: int, blocks: SplashBlocks) -> bool:
  return splash_shape_problem(seq_len, blocks.q, blocks.kv) is None


def check_splash_shape(seq_len: int, blocks: SplashBlocks) -> None:
  """Splash tiles are multiples of 128 tokens that divide the sequence: a ValueError otherwise."""
  problem = splash_shape_problem(seq_len, blocks.q, blocks.kv)
  if problem:
    raise ValueError(problem)


def attention(q, k, v, *, causal: bool, q_offset=0, impl: str = "xla",
              splash_blocks: SplashBlocks = SplashBlocks()):
  """Multi-head attention. q: [B, T, H, K]; k, v: [B, S, H, K]; returns [B, T, H, K].

  Query t sits at absolute position q_offset + t and may see keys 0..q_offset + t (causal).
  Scores and softmax are float32 whatever the compute dtype. A pass that is not over the whole
  sequence at once (decoding against a cache) takes the xla path whatever `impl` says.
  """
  impl = resolve(impl, dtype=q.dtype, seq_len=q.shape[1], blocks=splash_blocks)
  full_pass = q.shape[1] == k.shape[1] and isinstance(q_offset, int) and q_offset == 0
  if impl == "splash" and full_pass:
    return splash_attention(q, k, v, causal=causal, blocks=splash_blocks)  # names its residuals
  if impl == "cudnn" and full_pass:
    out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    return checkpoint_name(out, ATTENTION_OUT)
  if impl == "blocked" and causal and full_pass:
    return checkpoint_name(blocked_causal_attention(q, k, v), ATTENTION_OUT)
  return checkpoint_name(xla_attention(q, k, v, causal=causal, q_offset=q_offset), ATTENTION_OUT)


def xla_attention(q, k, v, *, causal: bool, q_offset=0):
  scores = jnp.einsum("bthk,bshk->bhts", q, k, preferred_element_type=jnp.float32)
  scores = scores * (q.shape[-1] ** -0.5)
  if causal:
    q_pos = q_offset + jnp.arange(q.shape[1])
    k_pos = jnp.arange(k.shape[1])
    scores = jnp.where(q_pos[:, None] >= k_pos[None, :], scores, -1e10)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhts,bshk->bthk", probs, v)


def blocked_causal_attention(q, k, v, block: int = BLOCKED_QUERY_BLOCK):
  """Causal attention by query blocks: block i sees keys [0, (i + 1) * block) only.

  The same function as `xla_attention(..., causal=True)`, but the fully masked upper blocks are
  never computed (about half the score FLOPs and bytes at 1024 tokens) and each block's scores
  stay small enough for CPU caches. Heads go in front ([B, H, T, K]) so every block is a plain
  batched matmul over contiguous rows: with XLA on CPUs that layout alone is worth ~2x in the
  backward pass.
  """
  t, scale = q.shape[1], q.shape[-1] ** -0.5
  if t % block or t <= block or k.shape[1] != t:
    return xla_attention(q, k, v, causal=True)
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
  out = []
  for i in range(t // block):
    end = (i + 1) * block
    scores = jnp.einsum("bhtk,bhsk->bhts", q[:, :, i * block:end], k[:, :, :end],
                        preferred_element_type=jnp.float32) * scale
    q_pos = i * block + jnp.arange(block)
    scores = jnp.where(q_pos[:, None] >= jnp.arange(end)[None, :], scores, -1e10)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out.append(jnp.einsum("bhts,bhsk->bhtk", probs, v[:, :, :end]))
  return jnp.swapaxes(jnp.concatenate(out, axis=2), 1, 2)


# -- splash ------------------------------------------------------------------------------------

def _splash_block_sizes(seq_len: int, blocks: SplashBlocks):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  check_splash_shape(seq_len, blocks)
  bq, bkv = min(blocks.q, seq_len), min(blocks.kv, seq_len)
  return sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                       block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)


@functools.lru_cache(maxsize=16)
def _splash_kernel(heads: int, seq_len: int, causal: bool, blocks: SplashBlocks,
                   head_shards: int, interpret: bool):
  """The kernel for all `heads` (its mask tables split into `head_shards`); cached, since
  building the mask tables walks every block.

  The tables must be concrete numpy arrays, constants of the compiled step: the kernel is first
  asked for while the step is traced, where jnp.array would give tracers (leaked by the cache)
  or arrays on the mesh's devices (compile-only TPUs hold none), and a closed-over jax.Array
  becomes a hidden argument that an ahead-of-time compiled step is later called without. So
  they are built in a thread of their own, outside this thread's trace and mesh.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  shape = (seq_len, seq_len)
  one = sm.CausalMask(shape) if causal else sm.FullMask(shape)

  def build():
    try:
      host = jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu: the default device, then numpy
      host = None
    with jax.default_device(host):
      kernel = sk.make_splash_mha(
          sm.MultiHeadMask([one] * heads), block_sizes=_splash_block_sizes(seq_len, blocks),
          head_shards=head_shards, q_seq_shards=1, residual_checkpoint_name=ATTENTION_OUT,
          interpret=interpret)
      return jax.tree.map(np.asarray, kernel)

  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(build).result()


def splash_attention(q, k, v, *, causal: bool, blocks: SplashBlocks = SplashBlocks()):
  """Splash attention over [B, T, H, K]; within a mesh, per device through `jax.shard_map`.

  The kernel takes one example's [H, T, K]; `jax.vmap` runs it over the device's rows. Queries
  are scaled by 1/sqrt(K) first (the kernel does not scale).
  """
  batch, seq_len, heads, head_dim = q.shape
  interpret = platform() == "cpu"
  precision = jax.config.jax_default_matmul_precision
  if not interpret and precision not in (None, "default", "bfloat16", "fastest"):
    # Mosaic compiles the kernel's bf16 dots at the default precision only (it fails with
    # "Bad lhs type" otherwise), and reads the setting when the whole step is lowered.
    raise ValueError(f"attention='splash' on a TPU needs jax_default_matmul_precision left at "
                     f"its default (it is {precision!r}); use model.attention='xla' for "
                     "higher-precision matmuls.")
  q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, H, T, K]
  mesh = jax.sharding.get_abstract_mesh()
  spec = sharding_lib.activation_spec(q.shape, ("batch", "heads", None, None))
  if mesh.empty or spec is None:
    kernel = _splash_kernel(heads, seq_len, causal, blocks, 1, interpret)
    return jnp.swapaxes(jax.vmap(kernel)(q, k, v), 1, 2)
  head_axes = spec[1]
  kernel = _splash_kernel(heads, seq_len, causal, blocks, sharding_lib.axes_size(mesh, head_axes),
                          interpret)
  kernel_spec = kernel.manual_sharding_spec(
      jax.sharding.NamedSharding(mesh, P(head_axes, None)))

  def per_device(kernel, q, k, v):
    return jax.vmap(kernel)(q, k, v)

  out = jax.shard_map(per_device, mesh=mesh, in_specs=(kernel_spec, spec, spec, spec),
                      out_specs=spec, check_vma=False)(kernel, q, k, v)
  return jnp.swapaxes(out, 1, 2)


# -- FLOPs the compiler cannot see -------------------------------------------------------------

# Matmuls of [T, K] x [K, S] size each splash kernel does per head (its cost analysis counts
# none): forward QK^T and PV; the dq kernel recomputes the scores, dP = dO V^T and dQ = dS K;
# the dkv kernel recomputes the scores, dP, dV = P^T dO and dK = dS^T Q.
SPLASH_KERNEL_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}


def causal_block_fraction(seq_len: int, block_q: int, block_kv: int) -> float:
  """Share of the [T, T] score blocks a causal splash kernel visits (it skips blocks the mask
  hides whole): (n + 1) / 2n for n square blocks, 1/2 + 1/2n -- more than the model's 1/2."""
  bq, bkv = min(block_q, seq_len), min(block_kv, seq_len)
  rows = np.arange(seq_len // bq)
  last_visible = (rows + 1) * bq - 1  # last query of each row of blocks
  visited = np.minimum(last_visible // bkv + 1, seq_len // bkv).sum()
  return float(visited) / ((seq_len // bq) * (seq_len // bkv))
