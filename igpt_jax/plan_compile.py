"""Compiling a config's train step for given devices -- the loop's own step: same mesh
function, rules, shardings and micro-batching -- and reading what the compiler says: memory,
whether it fits, FLOPs and HBM bytes (the roofline). No array is allocated.

FLOPs come from the compiler's cost analysis. XLA counts a loop body once, and the layers (and
micro-batches) are loops, so the step's FLOPs and HBM bytes are measured on unrolled 1- and
2-layer twins of the step and extrapolated linearly in depth: the per-layer cost, remat and
all, is what the compiler emitted. The cost analysis cannot see inside a Pallas kernel (it
counts a splash kernel's bytes, not its FLOPs), so every splash kernel call in the compiled
twins is found by name and its matmuls are added analytically (`kernel_flops`).
"""

from __future__ import annotations

import math
import re
import time

import jax
import ml_collections

from igpt_jax import attention as attention_lib
from igpt_jax import model as model_lib
from igpt_jax import sharding as sharding_lib
from igpt_jax import targets as targets_lib
from igpt_jax import train as train_lib

GIB = targets_lib.GIB


def gib(gibibytes: float) -> str:
  """GiB for a sentence: two decimals, or three significant digits below 0.1 (a tiny model's
  step is not '0.00 GiB')."""
  return f"{gibibytes:.2f}" if gibibytes >= 0.1 else f"{gibibytes:.3g}"


def with_overrides(config, overrides: dict):
  """A copy of `config` with {'mesh.fsdp': -1, ...} applied."""
  new = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    if key.startswith("_"):  # the search's own bookkeeping
      continue
    section, field = key.split(".")
    new[section][field] = value
  return new


def compile_step(config, devices):
  """The loop's compiled train step for `config` on `devices` -> (compiled, mesh)."""
  cfg = model_lib.ModelConfig.from_config(config)
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  trainer = train_lib.Trainer(cfg, config, mesh, sharding_lib.rules_from_config(config))
  return trainer.compile_step(), mesh


def state_bytes(config) -> int:
  """Bytes of the whole model's parameters, their gradients and the optimizer state: no layout,
  remat or micro-batching shrinks a device's share below these over one slice's devices
  (our meshes shard within a slice and replicate across slices)."""
  from flax import nnx
  from igpt_jax import optim
  cfg = model_lib.ModelConfig.from_config(config)
  tx = optim.make_optimizer(train_lib.train_section(config))

  def init(key):
    params = nnx.to_pure_dict(nnx.state(model_lib.ImageGPT(cfg, rngs=nnx.Rngs(key)), nnx.Param))
    return params, params, tx.init(params)  # the second: the gradients, as large

  shapes = jax.eval_shape(init, jax.random.key(0))
  return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(shapes))


def undivided(config, mesh) -> str:
  """sharding.undivided for the model `config` makes on `mesh` ('' when all is split)."""
  from flax import nnx
  _, params = nnx.split(model_lib.abstract_model(model_lib.ModelConfig.from_config(config)),
                        nnx.Param)
  return sharding_lib.undivided(params, mesh, sharding_lib.rules_from_config(config))


def attention_ran(config, mesh) -> str:
  """The attention the step compiled for `mesh` runs ('auto' resolved for its platform)."""
  return model_lib.ModelConfig.from_config(config).attention_on(attention_lib.mesh_platform(mesh))


def _out_of_memory(error: Exception) -> str | None:
  text = str(error)
  if "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text:
    return next((line.strip() for line in text.splitlines() if "memory" in line.lower()),
                text.splitlines()[0])[:300]
  return None


def try_compile(config, devices, hbm_bytes: int) -> dict:
  """Compiles the step; the compiler's out-of-memory error is an answer (fits: false), not a
  crash. Returns memory figures, `fits`, every host's row assignment (checked) and `compile_s`."""
  began = time.perf_counter()
  try:
    compiled, mesh = compile_step(config, devices)
  except Exception as e:  # noqa: BLE001 - only the compiler's OOM is an answer; others re-raise
    why = _out_of_memory(e)
    if why is None:
      raise
    return {"fits": False, "out_of_memory": why, "compile_s": time.perf_counter() - began}
  out = train_lib.memory_report(compiled)
  out["mesh"] = dict(mesh.shape)
  out["attention"] = attention_ran(config, mesh)
  whole = undivided(config, mesh)
  if whole:
    out["undivided"] = whole
  if "per_device_bytes" in out:
    out["per_device_gib"] = round(out["per_device_bytes"] / GIB, 3)
  out["fits"] = out.get("per_device_bytes", 0) <= hbm_bytes
  out["rows"] = sharding_lib.check_row_assignment(mesh, sharding_lib.rules_from_config(config),
                                                  config.train.batch_size)
  out["compile_s"] = time.perf_counter() - began
  return out


# A splash kernel call in compiled HLO: its name says which kernel; among its outputs is the
# device's [batch, heads, seq, head_dim] block ([heads, seq, head_dim] for one row).


_SPLASH_CALL = re.compile(r"%splash_mh?q?a_(fwd|dq|dkv)[\w.]*\s*=\s*\((.*?)\)\s*custom-call\(")
_SHAPE = re.compile(r"\w+\[([\d,]+)\]")


def kernel_flops(hlo_text: str, cfg: model_lib.ModelConfig) -> float:
  """FLOPs of the splash kernels in a compiled step's HLO, per device: each call's matmuls
  (attention.SPLASH_KERNEL_MATMULS) over the blocks its mask lets it visit (a causal kernel
  visits the diagonal blocks whole: attention.causal_block_fraction)."""
  blocks = cfg.splash_blocks
  fraction = (attention_lib.causal_block_fraction(cfg.seq_len, blocks.q, blocks.kv)
              if cfg.causal else 1.0)
  total = 0.0
  for kind, outputs in _SPLASH_CALL.findall(hlo_text):
    shapes = [tuple(map(int, dims.split(","))) for dims in _SHAPE.findall(outputs)]
    # batch x heads of this device: the largest output ending in [seq, head_dim] (the kernel's
    # scratch blocks are [block_q, head_dim], and block_q may be the whole sequence)
    rows = max((math.prod(s[:-2]) for s in shapes
                if len(s) >= 3 and s[-2:] == (cfg.seq_len, cfg.head_dim)), default=None)
    if rows is None:
      raise ValueError(f"plan: cannot read the shape of a splash kernel call: {outputs[:200]}")
    total += (attention_lib.SPLASH_KERNEL_MATMULS[kind] * 2 * rows * cfg.seq_len ** 2
              * cfg.head_dim * fraction)
  return total


def compiler_cost(config, devices) -> dict:
  """Per-device FLOPs and HBM bytes of one step, from the compiler's cost analysis of unrolled
  1- and 2-layer twins (one micro-batch each), extrapolated to the model's depth and times
  the micro-batches; `kernel_flops` are the fused kernels' FLOPs the cost analysis misses."""
  accum = config.train.accum_steps
  costs = []
  for layers in (1, 2):
    twin = with_overrides(config, {"model.num_layers": layers, "model.scan_layers": False,
                                   "train.accum_steps": 1,
                                   "train.batch_size": config.train.batch_size // accum})
    compiled, _ = compile_step(twin, devices)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if not cost:
      return {}  # XLA's CUDA compiler offers no cost analysis
    kernels = kernel_flops(compiled.as_text(), model_lib.ModelConfig.from_config(twin))
    costs.append((float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)),
                  kernels))
  (f1, b1, k1), (f2, b2, k2) = costs
  depth = config.model.num_layers - 1
  return {"flops": accum * (f1 + depth * (f2 - f1)), "bytes": accum * (b1 + depth * (b2 - b1)),
          "kernel_flops": accum * (k1 + depth * (k2 - k1))}


def roofline(config, devices, chip: targets_lib.Chip, chips: int) -> dict:
  """Step time if compute or HBM traffic ran at the chip's peak (whichever binds), and the MFU
  that time implies (model FLOPs: 6N + attention, as training's MFU counts them). Compute is
  the compiler's FLOPs plus the fused kernels'; `run_hours` and `chip_hours` are train.steps at
  that step time: a lower bound on the run's cost."""
  cost = compiler_cost(config, devices)
  if not cost:
    return {"roofline": "unavailable: this compiler gives no cost analysis"}
  cfg = model_lib.ModelConfig.from_config(config)
  tokens = config.train.batch_size * cfg.seq_len
  model_flops = model_lib.flops_per_token(cfg) * tokens
  counted = cost["flops"] + cost["kernel_flops"]
  # The cost analysis counts a loop body once; where the compiler itself makes loops (a
  # collective matmul over the tensor axis) its count falls below the model's: then the
  # model's count stands in, so the roofline never claims more than 100% MFU.
  flops = max(counted, model_flops / chips)
  step_s = targets_lib.roofline(flops, cost["bytes"], chip)
  run_hours = config.train.steps * step_s / 3600
  return {"compiler_flops_per_device": cost["flops"],
          "kernel_flops_per_device": cost["kernel_flops"],
          "counted_over_model_flops": counted * chips / model_flops,
          "flops_undercounted": counted * chips < model_flops,
          "hbm_bytes_per_device": cost["bytes"],
          "model_flops_per_step": model_flops,
          "step_s_roofline": step_s, "tokens_per_s_roofline": tokens / step_s,
          "mfu_roofline": model_flops / (chips * chip.peak_flops * step_s),
          "bound": "compute" if flops / chip.peak_flops >= cost["bytes"] / chip.hbm_bandwidth
                   else "HBM bandwidth",
          "run_hours": run_hours, "chip_hours": run_hours * chips}
