"""The search `plan` runs when a step does not fit (or fits with room to spare): the settings a
user can change, best-estimated first, each compiled until one fits; printed as overrides."""

from __future__ import annotations

import jax

from igpt_jax import attention as attention_lib
from igpt_jax import model as model_lib
from igpt_jax.plan_compile import GIB, gib, try_compile, with_overrides

# Remat policies the search tries, least recomputation first; the values only order them (a
# rough share of the forward pass each recomputes). The chosen setting's figures are the compiler's.
REMAT_COST = {"none": 0.0, "save:query,key,value,attention_out,mlp_hidden": 0.25,
              "dots_with_no_batch_dims_saveable": 0.5, "full": 1.0}

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
  or None -- then the log names the closest one tried. With `better_than` (a setting that
  already fits) only better-ranked ones are tried; `skip` (the setting already compiled) is not
  tried again."""
  tried, closest = 0, None
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
    verdict = (f"{gib(result['per_device_gib'])} GiB" if "per_device_gib" in result
               else "out of memory")
    log(f"plan: tried {overrides_text(setting)}: {verdict} ({result['compile_s']:.1f} s)")
    if result["fits"]:
      return {"overrides": overrides_text(setting), "setting": setting, **result}
    if "per_device_gib" in result and (closest is None or
                                       result["per_device_gib"] < closest[0]):
      closest = (result["per_device_gib"], setting)
  if closest is not None and better_than is None:
    log(f"plan: the closest of the {tried} settings tried: {gib(closest[0])} GiB per device, "
        f"{gib(hbm_bytes / GIB)} available ({overrides_text(closest[1])}).")
  return None


def overrides_text(setting: dict) -> str:
  return " ".join(f"--config.{k}={v}" for k, v in setting.items() if not k.startswith("_"))
