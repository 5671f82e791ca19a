"""The workdir: where each stage's outputs live, and the hand-off between stages.

One place for the layout (palette, checkpoints/<stage>/, metrics, reports) so that every stage
and every process agrees on it. Paths are `etils.epath` paths, so a `gs://` workdir works like a
local one (Orbax uses the same library). Files other than checkpoints are written by process 0.
"""

from __future__ import annotations

import hashlib
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


def result_path(workdir, stage: str) -> epath.Path:
  """A training stage's final result (its JSON line), beside its metrics.jsonl: what a rerun
  of a finished stage reports."""
  return stage_dir(workdir, stage) / "result.json"


def holds_steps(directory) -> bool:
  """Whether a checkpoint folder holds at least one step (without opening Orbax)."""
  directory = epath.Path(directory)
  return directory.exists() and any(p.name.isdigit() for p in directory.iterdir())


def has_checkpoints(workdir) -> list[epath.Path]:
  """The checkpoint folders of this workdir's training stages that hold at least one step."""
  return [checkpoint_dir(workdir, stage) for stage in ("pretrain", "finetune")
          if holds_steps(checkpoint_dir(workdir, stage))]


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


def remove(target) -> None:
  """Process 0 removes a file (there or not)."""
  if distributed.is_chief():
    epath.Path(target).unlink(missing_ok=True)


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


def palette_digest(centers) -> str:
  """The palette's identity in a checkpoint's meta: sha256 of its float32 centres."""
  return hashlib.sha256(np.ascontiguousarray(centers, np.float32).tobytes()).hexdigest()


def check_same_palette(meta: dict, centers, where, palette_file) -> None:
  """Refuses, in one sentence, a checkpoint trained with other colours than `centers`: resumed
  training or a later stage would silently read other tokens."""
  from igpt_jax import checkpoint as checkpoint_lib
  saved = meta.get("palette_sha256")
  if saved is None and "palette" in meta:  # checkpoints written before the digest
    saved = palette_digest(meta["palette"])
  if saved is None or saved == palette_digest(centers):
    return
  colours = len(meta["palette"]) if "palette" in meta else "?"
  raise checkpoint_lib.CheckpointMismatch(
      f"The checkpoint in {where} was trained with a different palette ({colours} colours) "
      f"than {palette_file} ({len(centers)} colours, other centres): put back the palette.npz "
      "it was trained with, or use a new --workdir.")


def check_split_rule(meta: dict, rule: str, where) -> None:
  """A training run resumes only under the hold-out it started with: under another, images it
  trained on would be validated on (checkpoints from before the record: 'permutation')."""
  from igpt_jax import checkpoint as checkpoint_lib
  saved = meta.get("split_rule", "permutation")
  if saved != rule:
    raise checkpoint_lib.CheckpointMismatch(
        f"The checkpoint in {where} held validation out of train by {saved!r}, this version of "
        f"the data source holds it out by {rule!r} (a folder's: by each file's path, so added "
        "or unreadable files move only themselves): resuming would train on images it "
        "validated on before. Start a new --workdir, or finish this run with the version that "
        "began it.")


def check_checkpoint(meta: dict, cfg, centers, where, palette_file) -> None:
  """What every stage that reads a checkpoint checks first: the model shape and the palette."""
  check_same_model(meta, cfg, where)
  check_same_palette(meta, centers, where, palette_file)


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
  has_checkpoint = holds_steps(directory)
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
    check_checkpoint(meta, cfg, centers, directory, palette_path(config, workdir))

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


def check_same_model(meta: dict, cfg, where) -> None:
  from igpt_jax import checkpoint as checkpoint_lib
  saved = meta.get("model", {})
  shape_keys = ("num_layers", "d_model", "num_heads", "mlp_ratio", "vocab_size", "seq_len",
                "objective", "use_bias")
  diff = {k: (saved.get(k), getattr(cfg, k)) for k in shape_keys if saved.get(k) != getattr(cfg, k)}
  if cfg.num_classes and saved.get("class_bias", True) != cfg.class_bias:  # old heads: a bias
    diff["finetune.head_bias"] = (saved.get("class_bias", True), cfg.class_bias)
  if diff:
    raise checkpoint_lib.CheckpointMismatch(
        f"The checkpoint in {where} is a different model: "
        + ", ".join(f"{k} saved {a} vs configured {b}" for k, (a, b) in diff.items())
        + ". Use another --workdir or match the config.")
