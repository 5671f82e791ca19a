"""Accelerators `plan` can compile for: the names users type into gcloud / their cluster, mapped to
a TPU topology (for libtpu's compile-only devices) and to per-chip figures for the roofline.

Per-chip figures (dense bfloat16 peak, HBM capacity, HBM bandwidth) are the vendors' published
specifications:
  TPU v4:  275 TFLOP/s, 32 GiB, 1,200 GB/s    cloud.google.com/tpu/docs/v4
  TPU v5e: 197 TFLOP/s, 16 GiB,   819 GB/s    cloud.google.com/tpu/docs/v5e
  TPU v5p: 459 TFLOP/s, 95 GiB, 2,765 GB/s    cloud.google.com/tpu/docs/v5p
  TPU v6e: 918 TFLOP/s, 32 GiB, 1,640 GB/s    cloud.google.com/tpu/docs/v6e
  A100 80GB SXM: 312 TFLOP/s,  80 GB, 2,039 GB/s   NVIDIA A100 datasheet
  H100 SXM:      989 TFLOP/s,  80 GB, 3,350 GB/s   NVIDIA H100 datasheet (dense, no sparsity)
  H200 SXM:      989 TFLOP/s, 141 GB, 4,800 GB/s   NVIDIA H200 datasheet
What a program may use of a TPU's HBM is the compiler's own limit, a little below the chip's
(libtpu keeps some for itself): `usable_bytes`, as libtpu 0.0.42's out-of-memory message states
it ("exceeds available HBM (15.75G)" on v5e; tests/test_plan.py compiles an oversized program
for each generation and checks this table against the message). v5p's limit is above its
published 95 GiB. GPUs: the device's memory (XLA's allocator may reserve less; not modelled).
GPU targets compile with XLA's CUDA compiler without a GPU when jax's CUDA plugin is installed
(`pip install "jax[cuda12]"`): compile-only devices from a device description (`gpu_config`,
the fields XLA reads from a real device: SMs, shared memory, L2, clock, compute capability).
Name conventions (gcloud accelerator types): v4-N and v5p-N count TensorCores (2 per chip, one
megacore device per chip); v5litepod-N (alias v5e-N) and v6e-N count chips. Multi-host slices
have 4 chips per host; v5e/v6e slices of up to 8 chips are one host.
"""

from __future__ import annotations

import dataclasses
import re

from igpt_jax.config import UserError

GIB, GB, TERA = 2**30, 10**9, 10**12


@dataclasses.dataclass(frozen=True)
class Chip:
  generation: str  # topology prefix libtpu knows ('v5e'), or 'gpu'
  hbm_bytes: int
  peak_flops: float  # dense bfloat16 FLOP/s
  hbm_bandwidth: float  # bytes/s
  cores_in_name: int  # the accelerator name counts chips x this
  dims: int  # 2-D or 3-D torus
  gpu: tuple = ()  # GPUs: (name, compute capability, SMs, shared memory per SM and per block
  #                  opt-in, L2 bytes, clock GHz) for XLA's device description
  usable_bytes: int = 0  # the compiler's limit per chip (0: hbm_bytes)


CHIPS = {
    "v4": Chip("v4", 32 * GIB, 275 * TERA, 1200 * GB, 2, 3, usable_bytes=int(30.75 * GIB)),
    "v5litepod": Chip("v5e", 16 * GIB, 197 * TERA, 819 * GB, 1, 2,
                      usable_bytes=int(15.75 * GIB)),
    "v5p": Chip("v5p", 95 * GIB, 459 * TERA, 2765 * GB, 2, 3, usable_bytes=int(95.74 * GIB)),
    "v6e": Chip("v6e", 32 * GIB, 918 * TERA, 1640 * GB, 1, 2, usable_bytes=int(31.25 * GIB)),
}
ALIASES = {"v5e": "v5litepod"}
GPUS = {
    "a100-80gb": Chip("gpu", 80 * GB, 312 * TERA, 2039 * GB, 1, 0,
                      ("NVIDIA A100-SXM4-80GB", (8, 0), 108, 167936, 166912, 40 * 2**20, 1.41)),
    "h100": Chip("gpu", 80 * GB, 989 * TERA, 3350 * GB, 1, 0,
                 ("NVIDIA H100 80GB HBM3", (9, 0), 132, 233472, 232448, 50 * 2**20, 1.98)),
    "h200": Chip("gpu", 141 * GB, 989 * TERA, 4800 * GB, 1, 0,
                 ("NVIDIA H200", (9, 0), 132, 233472, 232448, 50 * 2**20, 1.98)),
}
GPUS_PER_HOST = 8


def chip_for_device_kind(kind: str) -> Chip | None:
  """The GPU chip whose name jax reports as `kind` (e.g. 'NVIDIA H200'), or None."""
  for chip in GPUS.values():
    if kind.startswith(chip.gpu[0]) or chip.gpu[0].startswith(kind):
      return chip
  return None
EXAMPLES = "v4-32, v5litepod-64, v5p-128, v6e-64, h100, h200-8, a100-80gb"


@dataclasses.dataclass(frozen=True)
class Target:
  name: str  # as the user typed it
  platform: str  # 'tpu' | 'gpu'
  chips: int  # per slice
  chip: Chip
  topology: str = ""  # libtpu topology name, e.g. 'v5e:8x8' (TPU only)
  chips_per_host: tuple = ()  # chips_per_host_bounds for libtpu; () = its default

  @property
  def hbm_bytes(self) -> int:
    return self.chip.hbm_bytes

  @property
  def usable_bytes(self) -> int:
    """What the compiler lets a program use per chip: what `plan` judges fits against."""
    return self.chip.usable_bytes or self.chip.hbm_bytes


def topology_shape(chips: int, dims: int) -> tuple[int, ...]:
  """The slice shape of `chips` chips: 2-D (v5e, v6e: 8x8) or 3-D (v4, v5p: 4x4x8)."""
  if chips < 1 or chips & (chips - 1):
    raise ValueError(chips)
  e = chips.bit_length() - 1
  if dims == 2:
    return (2 ** (e // 2), 2 ** (e - e // 2))
  if chips == 4:
    return (2, 2, 1)
  return (2 ** (e // 3), 2 ** ((e + 1) // 3), 2 ** ((e + 2) // 3))


def parse(name: str) -> Target:
  """'v5litepod-64' -> Target; a one-line UserError for anything else."""
  text = name.strip().lower()
  gpu = re.fullmatch(r"(a100-80gb|h100|h200)(?:-(\d+))?", text)
  if gpu:
    return Target(name, "gpu", int(gpu.group(2) or 1), GPUS[gpu.group(1)])
  tpu = re.fullmatch(r"(v4|v5litepod|v5e|v5p|v6e)-(\d+)", text)
  if not tpu:
    raise UserError(f"--config.plan.target={name!r} is not an accelerator this plan knows; "
                    f"use a name like {EXAMPLES}.")
  chip = CHIPS[ALIASES.get(tpu.group(1), tpu.group(1))]
  count = int(tpu.group(2))
  chips = count // chip.cores_in_name
  if count % chip.cores_in_name or chips < 1 or chips & (chips - 1) or chips > 8192:
    raise UserError(f"--config.plan.target={name!r}: {tpu.group(1)} slices come in powers of two "
                    f"{'TensorCores (2 per chip)' if chip.cores_in_name == 2 else 'chips'}, "
                    f"e.g. {tpu.group(1)}-{16 * chip.cores_in_name}.")
  shape = topology_shape(chips, chip.dims)
  # Single-host v5e/v6e machines carry up to 8 chips; libtpu's default is 4 per host.
  per_host = (2, 4, 1) if chip.dims == 2 and chips == 8 else ()
  return Target(name, "tpu", chips, chip, f"{chip.generation}:{'x'.join(map(str, shape))}",
                per_host)


def topology_devices(target: Target, slices: int = 1) -> list:
  """libtpu's compile-only devices of `slices` slices of the target: every chip with its host
  (process_index), coordinates and slice. Nothing is allocated; no TPU is needed."""
  if not has_libtpu():
    raise UserError(f"Planning for {target.name} needs libtpu's compiler: pip install "
                    "'jax[tpu]==<your jax version>' (or `pip install -e .[tpu]`).")
  quiet_libtpu_without_tpu()
  from jax.experimental import topologies
  kwargs = {"num_slices": slices}
  if target.chip.cores_in_name == 2:
    kwargs["chip_config_name"] = "megacore"  # one device per chip, as JAX runs v4/v5p
  if target.chips_per_host:
    kwargs["chips_per_host_bounds"] = target.chips_per_host
  return list(topologies.get_topology_desc(platform="tpu", topology_name=target.topology,
                                           **kwargs).devices)


def has_libtpu() -> bool:
  """Whether JAX can find libtpu: the `libtpu` package, or a library named by TPU_LIBRARY_PATH."""
  import importlib.util
  import os
  return importlib.util.find_spec("libtpu") is not None or bool(os.environ.get("TPU_LIBRARY_PATH"))


def has_tpu() -> bool:
  """A TPU VM exposes its chips as /dev/accel* (v4, v5e) or /dev/vfio (v5p, v6e)."""
  import glob
  import os
  return bool(glob.glob("/dev/accel*")) or os.path.isdir("/dev/vfio")


# libtpu flags that let XLA overlap FSDP's all-gathers and reduce-scatters with compute, as
# MaxText runs its v5e and v5p training configs: the seven shared by MaxText/configs/v5e/16b.sh,
# v5e/128b.sh and v5p/128b.sh (LIBTPU_INIT_ARGS there). v5p/128b.sh adds megacore- and
# collective-permute-specific ones (xla_tpu_megacore_fusion_allow_ags=false,
# xla_enable_async_collective_permute, xla_tpu_enable_ag_backward_pipelining), left out here:
# one set for every generation, so that a plan and the run it describes compile alike.
LIBTPU_FLAGS = (
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
    "--xla_tpu_data_parallel_opt_different_sized_ops=true",
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
    "--xla_enable_async_all_gather=true",
)


def set_libtpu_flags() -> str:
  """LIBTPU_INIT_ARGS for training on a TPU and for planning with libtpu's compiler: ours
  (LIBTPU_FLAGS) unless the user set their own, which are then left exactly as they are.
  Read by libtpu when JAX starts it, so called before any backend starts. Returns the flags."""
  import os
  if "LIBTPU_INIT_ARGS" not in os.environ:
    os.environ["LIBTPU_INIT_ARGS"] = " ".join(LIBTPU_FLAGS)
  return os.environ["LIBTPU_INIT_ARGS"]


def quiet_libtpu_without_tpu() -> None:
  """On a machine without a TPU, an installed libtpu still looks for a TPU VM's metadata server
  and host list when JAX starts, and prints a screen of warnings about each; these settings
  (left alone where a user set them, never set on a TPU VM) tell it there is nothing to find."""
  import os
  if has_tpu():
    return
  # Compile-only use: several processes (a test and the CLI it starts) may load libtpu at once.
  for key, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
                     ("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_ID", "0"),
                     ("TPU_WORKER_HOSTNAMES", "localhost"),
                     ("TPU_ACCELERATOR_TYPE", "v5litepod-8")):
    os.environ.setdefault(key, value)


def gpu_config(chip: Chip) -> str:
  """XLA's GpuTargetConfig (text proto) for a GPU model: what the CUDA compiler would read from
  the device, so it can compile without one."""
  name, (major, minor), sms, smem_core, smem_optin, l2, clock = chip.gpu
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {smem_core} threads_per_core_limit: 2048 core_count: {sms}
  fpus_per_core: {64 if major < 9 else 128} block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535 block_dim_limit_z: 65535 memory_bandwidth: {int(chip.hbm_bandwidth)}
  l2_cache_size: {l2} clock_rate_ghz: {clock} device_memory_size: {chip.hbm_bytes}
  shared_memory_per_block_optin: {smem_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{name}"
"""


def has_cuda_compiler() -> bool:
  """Whether jax's CUDA plugin (with XLA's CUDA compiler) is installed; no GPU is needed."""
  import importlib.util
  return any(importlib.util.find_spec(m) is not None
             for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))


def gpu_devices(target: Target) -> list:
  """Compile-only CUDA devices of the target (GPUS_PER_HOST per host), or [] when jax's CUDA
  plugin is not installed."""
  if not has_cuda_compiler():
    return []
  from jax.experimental import topologies
  per_host = min(target.chips, GPUS_PER_HOST)
  if target.chips % per_host:
    raise UserError(f"--config.plan.target={target.name}: {target.chips} GPUs do not fill hosts "
                    f"of {GPUS_PER_HOST}.")
  return list(topologies.get_topology_desc(
      target.name, platform="cuda", topology=f"1x{target.chips // per_host}x{per_host}",
      target_config=gpu_config(target.chip)).devices)


def hosts(devices) -> int:
  return len({d.process_index for d in devices})


def roofline(flops_per_device: float, bytes_per_device: float, chip: Chip) -> float:
  """Seconds per step if the step ran at the chip's peak compute or HBM bandwidth, whichever
  binds; communication and imperfect overlap make real steps slower."""
  return max(flops_per_device / chip.peak_flops, bytes_per_device / chip.hbm_bandwidth)
