"""The `plan` stage: size a model and compile the train step the loop runs -- same mesh function,
rules, shardings and micro-batching -- for simulated CPU devices or for a named accelerator with
its own compiler, then say whether it fits, how fast it could go, and what to change if not.

TPU targets compile with libtpu against compile-only devices of the whole slice (every chip,
host and slice, `targets.topology_devices`): XLA's real TPU compiler and memory analysis, no TPU.
GPU targets compile with XLA's CUDA compiler against compile-only devices when jax's CUDA
plugin is installed, else for simulated CPU devices, labelled as estimates.

FLOPs come from the compiler's cost analysis. XLA counts a loop body once, and the layers (and
micro-batches) are loops, so the step's FLOPs and HBM bytes are measured on unrolled 1- and
2-layer twins of the step and extrapolated linearly in depth: the per-layer cost, remat and
all, is what the compiler emitted. The cost analysis cannot see inside a Pallas kernel (it
counts a splash kernel's bytes, not its FLOPs), so every splash kernel call in the compiled
twins is found by name and its matmuls are added analytically (`kernel_flops_per_device`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time

import jax
import ml_collections

from igpt_jax import attention as attention_lib
from igpt_jax import model as model_lib
from igpt_jax import sharding as sharding_lib
from igpt_jax import targets as targets_lib
from igpt_jax import train as train_lib
from igpt_jax.config import UserError

GIB = targets_lib.GIB
# Remat policies the search tries, least recomputation first; the values only order them (a
# rough share of the forward pass each recomputes). The chosen setting's figures are the compiler's.
REMAT_COST = {"none": 0.0, "save:query,key,value,attention_out,mlp_hidden": 0.25,
              "dots_with_no_batch_dims_saveable": 0.5, "full": 1.0}
ROOM = 0.5  # a step using under this share of HBM "fits with room to spare"


@dataclasses.dataclass(frozen=True)
class Budget:
  """What a plan judges a step against: `bytes` per device, called `name` in its sentences
  ('v5litepod-16', 'plan.device_memory_gb=80'); `platform` is the one the searched settings are for,
  `chip` (when known) prices the roofline."""
  name: str
  bytes: int
  platform: str
  chip: targets_lib.Chip | None = None
  unit: str = "chip"  # what the sentences call one device


def model_summary(config) -> dict:
  cfg = model_lib.ModelConfig.from_config(config)
  return {"stage": "plan", "params": model_lib.count_params(cfg),
          "flops_per_token": model_lib.flops_per_token(cfg), "num_layers": cfg.num_layers,
          "d_model": cfg.d_model, "num_heads": cfg.num_heads, "seq_len": cfg.seq_len,
          "vocab_size": cfg.vocab_size, "objective": cfg.objective,
          "batch_size": config.train.batch_size}


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


# -- search ------------------------------------------------------------------------------------

# Square splash tiles the search tries. One: the TPU compiler gives the same memory and bytes for
# 256, 512 and 1024 at 1024 tokens (it does not model a tile's re-reads or per-tile overhead), so a
# second size could never fit where the first does not. 512 is MaxText's default too.
SPLASH_BLOCKS_SEARCHED = (512,)


def attention_options(config, platform: str, compiled_on: str) -> list[dict]:
  """Attention settings the search tries on `platform`, fused kernels first. `compiled_on` is
  the platform of the devices compiled for (a GPU target estimated on CPUs cannot compile
  cuDNN's kernel, so only XLA's attention is tried there)."""
  seq_len = config.data.resolution ** 2
  dtype = "bfloat16" if platform in ("tpu", "gpu") else config.model.dtype
  out = []
  if platform == "tpu":
    for block in SPLASH_BLOCKS_SEARCHED:
      tile = min(block, seq_len)  # tiles are capped at the sequence: skip a repeat
      option = {"model.attention": "splash", "model.splash_block_q": tile,
                "model.splash_block_kv": tile}
      fits = attention_lib.splash_fits(seq_len, attention_lib.SplashBlocks(tile, tile))
      if fits and option not in out:
        out.append(option)
  if platform == "gpu" and compiled_on == "gpu" and jax.numpy.dtype(dtype).itemsize == 2:
    out.append({"model.attention": "cudnn"})
  if platform == "cpu" and config.model.objective == "ar":
    out.append({"model.attention": "blocked"})
  return out + [{"model.attention": "xla"}]


def candidates(config, chips: int, slices: int, platform: str, compiled_on: str = "") -> list[dict]:
  """Settings a user can change, best-estimated first: fused attention (the scores never
  reach HBM), then least recomputation, then fewest micro-batches, then least tensor
  parallelism (smaller matmuls), then plain data parallelism before FSDP (one gradient
  all-reduce instead of parameter gathers every micro-batch)."""
  batch, heads = config.train.batch_size, config.model.num_heads
  dtype = "bfloat16" if platform in ("tpu", "gpu") else config.model.dtype
  out = []
  for rank, attention in enumerate(attention_options(config, platform, compiled_on or platform)):
    for remat in REMAT_COST:
      for accum in (1, 2, 4, 8, 16):
        for tensor in (1, 2, 4, 8):
          if chips % tensor or heads % tensor:
            continue
          shards = chips // tensor
          if batch % (shards * slices * accum):
            continue
          for layout in ("data", "fsdp") if shards > 1 else ("data",):
            out.append({**attention, "mesh.data": shards if layout == "data" else 1,
                        "mesh.fsdp": shards if layout == "fsdp" else 1,
                        "mesh.tensor": tensor, "model.remat": remat,
                        "train.accum_steps": accum, "model.dtype": dtype, "_attention": rank})
  return out


def _rank(setting: dict) -> tuple:
  return (setting["_attention"], REMAT_COST.get(setting["model.remat"], 1.0),
          setting["train.accum_steps"], setting["mesh.tensor"], setting["mesh.fsdp"] > 1)


def current_setting(config, mesh: dict, platform: str, compiled_on: str) -> dict:
  """The config's own setting in `candidates`' terms ('auto' attention resolved)."""
  options = attention_options(config, platform, compiled_on)
  cfg = model_lib.ModelConfig.from_config(config)
  attention = {"model.attention": attention_lib.resolve(cfg.attention, platform, cfg.dtype,
                                                        cfg.seq_len, cfg.splash_blocks)}
  if attention["model.attention"] == "splash":
    attention.update({"model.splash_block_q": min(cfg.splash_block_q, cfg.seq_len),
                      "model.splash_block_kv": min(cfg.splash_block_kv, cfg.seq_len)})
  rank = options.index(attention) if attention in options else len(options)
  return {**attention, "mesh.data": mesh["data"] // max(config.mesh.slices, 1),
          "mesh.fsdp": mesh["fsdp"], "mesh.tensor": mesh["tensor"],
          "model.remat": config.model.remat, "train.accum_steps": config.train.accum_steps,
          "model.dtype": config.model.dtype, "_attention": rank}


def search(config, devices, hbm_bytes: int, chips: int, slices: int, platform: str,
           better_than: dict | None, log, max_compiles: int = 40,
           skip: dict | None = None) -> dict | None:
  """Compiles candidates best-estimated first; returns the first that fits (with its figures),
  or None. With `better_than` (a setting that already fits) only better-ranked ones are tried;
  `skip` (the setting already compiled) is not tried again."""
  tried = 0
  compiled_on = attention_lib.device_platform(devices[0])
  for setting in candidates(config, chips, slices, platform, compiled_on):
    if better_than is not None and _rank(setting) >= _rank(better_than):
      break
    if setting in (better_than, skip):
      continue
    if tried == max_compiles:
      log(f"plan: search stopped after {max_compiles} compiles.")
      break
    tried += 1
    try:
      result = try_compile(with_overrides(config, setting), devices, hbm_bytes)
    except Exception as e:  # noqa: BLE001 - a candidate the compiler rejects is not a plan's end
      log(f"plan: tried {overrides_text(setting)}: compile error "
          f"({str(e).splitlines()[0][:160]})")
      continue
    verdict = (f"{result['per_device_gib']:.2f} GiB" if "per_device_gib" in result
               else "out of memory")
    log(f"plan: tried {overrides_text(setting)}: {verdict} ({result['compile_s']:.1f} s)")
    if result["fits"]:
      return {"overrides": overrides_text(setting), "setting": setting, **result}
  return None


def overrides_text(setting: dict) -> str:
  return " ".join(f"--config.{k}={v}" for k, v in setting.items() if not k.startswith("_"))


# -- the stage ---------------------------------------------------------------------------------

def run(config, log=print) -> dict:
  out = model_summary(config)
  if not config.plan.target:
    return {**out, **plan_simulated(config, log)}
  target = targets_lib.parse(config.plan.target)
  if target.platform == "gpu":
    return {**out, **plan_gpu(config, target, log)}
  return {**out, **plan_tpu(config, target, log)}


def plan_simulated(config, log) -> dict:
  """The mesh on this machine's devices (or plan.num_devices simulated CPUs), judged against
  `memory_budget`: with one, a verdict and (when it does not fit) the search; without, the
  step's needs and how to get a verdict."""
  devices = jax.devices()
  if config.plan.num_devices:
    devices = devices[:config.plan.num_devices]
  budget = memory_budget(config, devices[0])
  if budget is None:
    compiled, mesh = compile_step(config, devices)
    out = {"mesh": dict(mesh.shape), **train_lib.memory_report(compiled),
           "attention": attention_ran(config, mesh)}
    whole = undivided(config, mesh)
    if whole:
      out["undivided"] = whole
      log(f"warning: {whole}")
    if "per_device_bytes" in out:
      out["per_device_gib"] = round(out["per_device_bytes"] / GIB, 3)
    log(f"plan: the step needs {out.get('per_device_gib', '?')} GiB per device on "
        f"{len(devices)} simulated CPU devices (mesh {out['mesh']}); for a verdict and settings "
        "that fit, add --config.plan.device_memory_gb=<GiB per device of your accelerator>, or "
        f"--config.plan.target=<accelerator> ({targets_lib.EXAMPLES}) to compile for it.")
    return out
  out = {"device_memory_gb": round(budget.bytes / GIB, 2), "budget": budget.name}
  out.update(_verdict(config, devices, budget, len(devices), max(config.mesh.slices, 1), log,
                      search_roomy=False))
  return out


def memory_budget(config, device) -> Budget | None:
  """plan.device_memory_gb; else, for this machine's own devices, their memory (an
  accelerator's allocator limit, or a CPU's RAM); None for simulated devices without it."""
  gib = config.plan.device_memory_gb
  if gib:
    return Budget(f"plan.device_memory_gb={gib:g}", int(gib * GIB), "cpu", unit="device")
  if config.plan.num_devices:
    return None
  platform = attention_lib.device_platform(device)
  if platform != "cpu":
    limit = (device.memory_stats() or {}).get("bytes_limit", 0)
    chip = targets_lib.chip_for_device_kind(device.device_kind)
    return (Budget(f"this {device.device_kind}", int(limit), platform, chip,
                   unit=platform.upper()) if limit else None)
  free = _available_ram()
  return Budget("this machine's free RAM", free, "cpu", unit="device")


def _available_ram() -> int:
  """RAM the kernel could give a new program now (MemAvailable), else all of it."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plan_tpu(config, target: targets_lib.Target, log) -> dict:
  slices = config.plan.slices or config.mesh.slices
  config = with_overrides(config, {"mesh.slices": slices})
  began = time.perf_counter()
  devices = targets_lib.topology_devices(target, slices)
  hbm = target.usable_bytes
  hosts = targets_lib.hosts(devices)
  log(f"plan: {target.name} x {slices} slice(s): {len(devices)} chips on {hosts} hosts "
      f"({devices[0].device_kind}, topology {target.topology}); compiling with libtpu...")
  out = {"target": target.name, "compiler": _libtpu_version(),
         "libtpu_flags": os.environ.get("LIBTPU_INIT_ARGS", ""), "chips": len(devices),
         "hosts": hosts, "slices": slices, "topology": target.topology,
         "hbm_gib": round(target.hbm_bytes / GIB, 2), "hbm_bytes": hbm,
         "usable_gib": round(hbm / GIB, 2)}
  out.update(_verdict(config, devices, _target_budget(target), len(devices), slices, log))
  out["plan_s"] = round(time.perf_counter() - began, 1)
  return out


def plan_gpu(config, target: targets_lib.Target, log) -> dict:
  """GPUs: XLA's CUDA compiler on compile-only devices when jax's CUDA plugin is installed (no
  GPU needed); otherwise simulated CPU devices (main starts the stage with as many as the
  target has GPUs) and XLA's CPU compiler, labelled an estimate."""
  devices = targets_lib.gpu_devices(target)
  if devices:
    plugin = next(((p, v) for p in ("jax-cuda12-plugin", "jax-cuda13-plugin")
                   if (v := _installed(p))), None)
    compiler = f"xla-cuda ({plugin[0]} {plugin[1]})" if plugin else "xla-cuda"
    log(f"plan: {target.name}: {target.chips} GPU(s) on {targets_lib.hosts(devices)} host(s); "
        "compiling with XLA's CUDA compiler (no GPU needed)...")
  else:
    devices = jax.devices()[:target.chips]
    if len(devices) < target.chips or devices[0].platform != "cpu":
      raise UserError(f"Planning for {target.name} needs {target.chips} simulated CPU devices; "
                      f"run the plan stage through igpt_jax.main, which provides them.")
    compiler = "cpu-estimate"
    log(f"plan: {target.name}: {target.chips} GPU(s), compiled for {target.chips} simulated CPU "
        "devices: an estimate from XLA's CPU compiler (pip install 'jax[cuda12]' for the CUDA "
        "compiler, no GPU needed).")
  out = {"target": target.name, "compiler": compiler, "chips": target.chips,
         "hosts": -(-target.chips // targets_lib.GPUS_PER_HOST), "slices": 1,
         "hbm_gib": round(target.hbm_bytes / GIB, 2), "hbm_bytes": target.usable_bytes,
         "usable_gib": round(target.usable_bytes / GIB, 2)}
  out.update(_verdict(config, devices, _target_budget(target), target.chips, 1, log))
  return out


def _target_budget(target: targets_lib.Target) -> Budget:
  return Budget(target.name, target.usable_bytes, target.platform, target.chip,
                unit="GPU" if target.platform == "gpu" else "chip")


def _installed(name: str) -> str | None:
  """The installed version of package `name`, or None."""
  from importlib import metadata
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return None


def _verdict(config, devices, budget: Budget, chips: int, slices: int, log,
             search_roomy: bool = True) -> dict:
  """Compiles the config's step, says in one sentence whether it fits `budget`, and searches
  for settings that do (or, with `search_roomy`, for faster ones when it has room to spare)."""
  hbm = budget.bytes
  result = try_compile(config, devices, hbm)
  out = {k: v for k, v in result.items() if k != "compile_s"}
  out["compile_s"] = round(result["compile_s"], 1)
  if "per_device_bytes" in result and config.plan.roofline and budget.chip:
    out.update(_rounded(roofline(config, devices, budget.chip, chips)))
  if "undivided" in out:
    log(f"warning: {out['undivided']}")
  unit = budget.unit
  per_slice = chips // slices
  floor = state_bytes(config) / per_slice  # per device, however the state is sharded
  searching = config.plan.search and floor <= hbm
  if result["fits"]:
    log(f"plan: fits {budget.name}: {out['per_device_gib']:.2f} of {hbm / GIB:.2f} GiB per "
        f"{unit} (attention {out['attention']})"
        + (f"; roofline {out['step_s_roofline']:.3f} s/step, MFU <= "
           f"{100 * out['mfu_roofline']:.0f}% ({out['bound']} bound)." if "mfu_roofline" in out
           else "."))
  else:
    log(f"plan: does NOT fit {budget.name}: "
        + (out.get("out_of_memory") or f"{out['per_device_gib']:.2f} GiB per {unit} "
           f"(mesh {out['mesh']}, attention {out['attention']})")
        + ("; searching for settings that fit (--config.plan.search=false skips this)..."
           if searching else "."))
  if not result["fits"] and floor > hbm:
    needed = math.ceil(floor * per_slice / hbm) * slices
    out["suggested"] = None
    out["devices_needed_at_least"] = needed
    log(f"plan: no setting on {_count(chips, unit)} can fit {budget.name}: the parameters, "
        f"gradients and optimizer state alone are {floor / GIB:.2f} GiB per {unit} however "
        f"they are sharded; it takes at least {_count(needed, unit)} of {hbm / GIB:.2f} GiB.")
    return out
  roomy = search_roomy and result["fits"] and result.get("per_device_bytes", 0) < ROOM * hbm
  if config.plan.search and (not result["fits"] or roomy):
    compiled_on = attention_lib.device_platform(devices[0])
    current = (current_setting(config, result["mesh"], budget.platform, compiled_on)
               if "mesh" in result else None)
    found = search(config, devices, hbm, per_slice, slices, budget.platform,
                   current if result["fits"] else None, log, skip=current)
    if found:
      suggestion = {"overrides": found["overrides"], "fits": True,
                    "per_device_gib": found["per_device_gib"],
                    "mesh": found["mesh"], "compile_s": round(found["compile_s"], 1)}
      if config.plan.roofline and budget.chip:
        suggestion.update(_rounded(roofline(with_overrides(config, found["setting"]), devices,
                                            budget.chip, chips)))
      out["suggested"] = suggestion
      log(f"plan: suggested (fits, {suggestion['per_device_gib']:.2f} GiB per {unit}"
          + (f", MFU <= {100 * suggestion['mfu_roofline']:.0f}%" if "mfu_roofline" in suggestion
             else "") + f"): {found['overrides']}")
    elif not result["fits"]:
      out["suggested"] = None
      log(f"plan: no setting searched fits {budget.name}; "
          + ("use a larger slice (or more slices)." if budget.platform == "tpu" else
             "use more devices (--config.plan.num_devices=N simulates N of them)."))
  return out


def _count(n: int, unit: str) -> str:
  return f"{n} {unit}" + ("" if n == 1 else "s")


def _rounded(d: dict) -> dict:
  return {k: (round(v, 4) if isinstance(v, float) and abs(v) < 1e6 else v) for k, v in d.items()}


def _libtpu_version() -> str:
  version = _installed("libtpu")  # None for a library given by TPU_LIBRARY_PATH
  return f"libtpu {version}" if version else "libtpu"

