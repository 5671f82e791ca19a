"""The `plan` stage: size a model and compile the train step the loop runs for simulated CPU
devices, this machine's devices or a named accelerator with its own compiler, then say in words
whether it fits, how fast it could go, and what to change if not.

TPU targets compile with libtpu against compile-only devices of the whole slice (every chip,
host and slice, `targets.topology_devices`): XLA's real TPU compiler and memory analysis, no TPU.
GPU targets compile with XLA's CUDA compiler against compile-only devices when jax's CUDA
plugin is installed, else for simulated CPU devices, labelled as estimates. Compiling and the
roofline: plan_compile.py; the search for settings that fit: plan_search.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import jax

from igpt_jax import attention as attention_lib
from igpt_jax import model as model_lib
from igpt_jax import targets as targets_lib
from igpt_jax.config import UserError
from igpt_jax.plan_compile import (GIB, gib, roofline, state_bytes, try_compile,
                                   with_overrides)
from igpt_jax.plan_search import current_setting, search

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
  if budget is None:  # the step's needs alone: the compile `_verdict` makes, without a verdict
    result = try_compile(config, devices, hbm_bytes=2**62)
    out = {k: v for k, v in result.items() if k not in ("fits", "compile_s", "rows")}
    if "undivided" in out:
      log(f"warning: {out['undivided']}")
    log(f"plan: the step needs {out.get('per_device_gib', '?')} GiB per device on "
        f"{len(devices)} simulated CPU devices (mesh {out['mesh']}); for a verdict and settings "
        "that fit, add --config.plan.device_memory_gb=<GiB per device of your accelerator>, or "
        f"--config.plan.target=<accelerator> ({targets_lib.EXAMPLES}) to compile for it.")
    return out
  out = {"device_memory_gb": float(f"{budget.bytes / GIB:.4g}"), "budget": budget.name}
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
    log(f"plan: fits {budget.name}: {gib(out['per_device_gib'])} of {gib(hbm / GIB)} GiB per "
        f"{unit} (attention {out['attention']})"
        + (f"; roofline {out['step_s_roofline']:.3f} s/step, MFU <= "
           f"{100 * out['mfu_roofline']:.0f}% ({out['bound']} bound)." if "mfu_roofline" in out
           else "."))
  else:
    log(f"plan: does NOT fit {budget.name}: "
        + (out.get("out_of_memory") or f"{gib(out['per_device_gib'])} GiB per {unit} "
           f"(mesh {out['mesh']}, attention {out['attention']})")
        + ("; searching for settings that fit (--config.plan.search=false skips this)..."
           if searching else "."))
  if not result["fits"] and floor > hbm:
    needed = math.ceil(floor * per_slice / hbm) * slices
    out["suggested"] = None
    out["devices_needed_at_least"] = needed
    log(f"plan: no setting on {_count(chips, unit)} can fit {budget.name}: the parameters, "
        f"gradients and optimizer state alone are {gib(floor / GIB)} GiB per {unit} however "
        f"they are sharded; it takes at least {_count(needed, unit)} of {gib(hbm / GIB)} GiB.")
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
      log(f"plan: suggested (fits, {gib(suggestion['per_device_gib'])} GiB per {unit}"
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
