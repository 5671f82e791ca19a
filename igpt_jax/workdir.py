"""The workdir: where each stage's outputs live, and the hand-off between stages.

One place for the layout (palette, checkpoints/<stage>/, metrics, reports) so that every stage
and every process agrees on it. Paths are `etils.epath` paths, so a `gs://` workdir works like a
local one (Orbax uses the same library). Files other than checkpoints are written by process 0.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from etils import epath

from igpt_jax import distributed
from igpt_jax.config import UserError


def path(p) -> epath.Path:
  """A workdir path: local paths made absolute, `gs://...` kept as it is."""
  text = os.fspath(p)
  return epath.Path(text if "://" in text else os.path.abspath(text))


def palette_path(config, workdir) -> epath.Path:
  from igpt_jax import palette as palette_lib
  return path(config.palette.path) if config.palette.path else path(workdir) / palette_lib.PALETTE_FILE


def checkpoint_dir(workdir, stage: str) -> epath.Path:
  return path(workdir) / "checkpoints" / stage


def stage_dir(workdir, stage: str) -> epath.Path:
  """Where a stage's metrics.jsonl and TensorBoard events go: pretraining's at the top."""
  return path(workdir) if stage == "pretrain" else path(workdir) / stage


RUN_TOKEN = ".run_token"


def check_same_workdir(workdir) -> None:
  """Every process must see process 0's workdir: process 0 writes a fresh token there and each
  process reads it back. A host that cannot see the checkpoints would take them for damaged."""
  if jax.process_count() == 1:
    return
  token_path = path(workdir) / RUN_TOKEN
  if distributed.is_chief():
    write_atomic(token_path, os.urandom(8).hex().encode())
  distributed.barrier("run_token_written")
  seen = token_path.read_text() if token_path.exists() else "nothing (no token file)"
  distributed.agree("workdir_token", seen, f"the workdir {path(workdir)} (its {RUN_TOKEN})")


def write_bytes(target, data: bytes) -> None:
  """Process 0 writes (see write_atomic)."""
  if distributed.is_chief():
    write_atomic(target, data)


def write_atomic(target, data: bytes) -> None:
  """This process writes, atomically (temporary file, then rename): readers never see half."""
  target = epath.Path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f".{target.name}.tmp"
  try:
    tmp.write_bytes(data)
    tmp.replace(target)
  except BaseException:  # a full disk, a quota, Ctrl-C: no half-written file stays behind
    try:
      tmp.unlink()
    except OSError:
      pass
    raise


def write_text(target, text: str) -> None:
  write_bytes(target, text.encode("utf-8"))


def write_json(target, obj) -> None:
  write_text(target, json.dumps(obj, indent=2))


# -- palette ----------------------------------------------------------------------------------

def load_palette(config, workdir) -> np.ndarray:
  from igpt_jax import palette as palette_lib
  palette = palette_lib.Palette.load(palette_path(config, workdir))
  if palette.k != config.palette.k:
    raise UserError(f"The palette at {palette_path(config, workdir)} has k={palette.k} but "
                    f"palette.k={config.palette.k}: refit it or set palette.k to match.")
  return palette.centers


def save_palette(palette, target) -> None:
  """Process 0 writes palette.npz, whole or not at all: readers on other hosts never see half."""
  write_bytes(target, palette.to_bytes())


# -- stage hand-off ---------------------------------------------------------------------------

def load_pretrained(config, workdir, mesh=None, rules=None, log=print):
  """(ModelConfig, params, centers, step): the newest intact pretraining step's parameters,
  sharded over the mesh; the optimizer state is not read.

  Refuses, in one sentence, a checkpoint whose model shape or palette differs from the config.
  """
  from igpt_jax import checkpoint as checkpoint_lib
  from igpt_jax import model as model_lib
  from igpt_jax import sharding as sharding_lib
  from igpt_jax import train as train_lib
  directory = checkpoint_dir(workdir, "pretrain")
  has_checkpoint = directory.exists() and any(p.name.isdigit() for p in directory.iterdir())
  if not has_checkpoint and not config.init_from:
    raise UserError(f"No pretraining checkpoint in {directory}: run the pretrain stage first "
                    "(or point --workdir at a run that has one, or start from released weights "
                    "with --config.init_from).")
  cfg = model_lib.ModelConfig.from_config(config)
  centers = load_palette(config, workdir)
  mesh = mesh or sharding_lib.make_mesh(config.mesh)
  rules = rules or sharding_lib.rules_from_config(config)
  if not has_checkpoint:  # released weights (released.py checked the shape and palette)
    from igpt_jax import released
    return cfg, released.params(config, cfg, mesh, rules, log=log), centers, 0

  def check(meta):
    check_same_model(meta, cfg, directory)
    saved = np.asarray(meta["palette"], np.float32)
    if saved.shape != centers.shape or not np.allclose(saved, centers, atol=1e-6):
      raise checkpoint_lib.CheckpointMismatch(
          f"The checkpoint in {directory} was trained with a different palette "
          f"({saved.shape[0]} colours) than the configured one: use the palette.npz it was "
          "trained with.")

  ckpt = checkpoint_lib.Checkpointer(directory)
  wanted = config.checkpoint.load_step
  try:
    distributed.agree("pretrain_checkpoint_steps", str(ckpt.all_steps()),
                      f"the checkpoint steps in {directory}")
    if wanted and wanted not in ckpt.all_steps():
      raise UserError(f"--config.checkpoint.load_step={wanted}: {directory} holds steps "
                      f"{', '.join(map(str, ckpt.all_steps()))}; choose one of them, or 0 for "
                      "the newest.")
    restored = ckpt.restore_latest({"params": train_lib.abstract_params(cfg, mesh, rules)},
                                   check_meta=check, log=log,
                                   steps=[wanted] if wanted else None)
  finally:
    ckpt.close()
  if restored is None:
    raise UserError(f"No readable pretraining checkpoint in {directory}"
                    + (f" at step {wanted}" if wanted else "") + ": run the pretrain stage again.")
  step, state, _ = restored
  log(f"Loaded pretrained parameters from step {step} of {directory}.")
  return cfg, state["params"], centers, step


def pretrained_identity(config, workdir, step: int) -> str:
  """Which weights `load_pretrained` gave at `step`: the checkpoint's own id (a re-run that
  reached the same step has another), or the released weights' path and modification time."""
  from igpt_jax import checkpoint as checkpoint_lib
  directory = checkpoint_dir(workdir, "pretrain")
  if directory.exists() and str(step) in {p.name for p in directory.iterdir()}:
    ckpt = checkpoint_lib.Checkpointer(directory)
    try:
      return f"step{step}:" + str(ckpt.read_meta(step).get("saved", "unnamed"))
    finally:
      ckpt.close()
  import os
  # An OpenAI prefix is no file itself (its .index and .data-* are); a folder's own time does
  # not change when a file in it is replaced: the newest file's time names what was read.
  target = config.init_from
  files = ([os.path.join(target, f) for f in os.listdir(target)] if os.path.isdir(target)
           else [p for p in (target, target + ".index") if os.path.exists(p)])
  return f"{target}@{max((os.stat(f).st_mtime_ns for f in files), default=0)}"


def check_same_model(meta: dict, cfg, where) -> None:
  from igpt_jax import checkpoint as checkpoint_lib
  saved = meta.get("model", {})
  shape_keys = ("num_layers", "d_model", "num_heads", "mlp_ratio", "vocab_size", "seq_len",
                "objective", "use_bias")
  diff = {k: (saved.get(k), getattr(cfg, k)) for k in shape_keys if saved.get(k) != getattr(cfg, k)}
  if diff:
    raise checkpoint_lib.CheckpointMismatch(
        f"The checkpoint in {where} is a different model: "
        + ", ".join(f"{k} saved {a} vs configured {b}" for k, (a, b) in diff.items())
        + ". Use another --workdir or match the config.")
