"""The stages the CLI runs, one module each, named as `--config.stage` names them.

Each is thin: read the workdir, call the library, write outputs, return the stage's JSON
result. Stages may call each other (pretrain fits a palette first when there is none); library
modules never import a stage.
"""

import importlib
import json

import numpy as np

from igpt_jax import config as config_lib
from igpt_jax import distributed
from igpt_jax import palette as palette_lib
from igpt_jax import released
from igpt_jax import workdir as workdir_lib
from igpt_jax.data import sources

NAMES = ("prepare", "fit_palette", "pretrain", "evaluate", "probe", "finetune", "sample", "plan",
         "export", "all")


def get(name: str):
  """The `run(config, workdir, log)` of stage `name`."""
  return importlib.import_module(f"igpt_jax.stages.{name}").run


def _install_palette(config, workdir, weights: released.Released, log=print) -> None:
  """The weights' palette becomes the workdir's palette.npz (process 0 writes it; a configured
  palette.path is used as it is). A workdir holding another palette is refused."""
  if config.palette.path:
    return
  source = palette_lib.Palette.load(weights.palette_path)
  target = workdir_lib.palette_path(config, workdir)
  if target.exists():
    have = palette_lib.Palette.load(target).centers
    if have.shape != source.centers.shape or not np.allclose(have, source.centers, atol=1e-6):
      raise config_lib.UserError(f"{target} holds another palette than the weights of "
                                 f"--config.init_from={config.init_from}: use a new --workdir.")
    return
  if distributed.is_chief():
    workdir_lib.save_palette(source, target)
    log(f"Palette of {config.init_from} ({source.k} colours) written to {target}.")
  distributed.barrier("install_palette")


def from_released(config, workdir, log=print):
  """What a stage that reads weights does first with init_from: check, then install the palette."""
  weights = released.open_released(config)  # reads the shape; the weights are read later
  config = released.resolved(config, weights, log)
  _install_palette(config, workdir, weights, log)
  return config


# Fields the pretraining checkpoints were made with that no later stage may change: the model
# they hold and the tokens it reads; resuming pretraining also keeps its data (the fields its
# source names it by, `Source.defining_fields`).
RUN_SHAPE = ("model.num_layers", "model.d_model", "model.num_heads", "model.mlp_ratio",
             "model.objective", "model.use_bias", "data.resolution", "data.channels", "palette.k")


def check_same_run(config, workdir) -> None:
  """A config that contradicts the run in `workdir` -- its pretraining checkpoints and the
  config.pretrain.json saved beside them -- is one error naming the fields that differ, before
  anything is written: caught early and in config terms, and pretraining resumed on other data
  (one model trained on two data sets, silently) is refused."""
  saved_path = workdir_lib.path(workdir) / "config.pretrain.json"
  if config.init_from or not saved_path.exists() or not workdir_lib.holds_steps(
      workdir_lib.checkpoint_dir(workdir, "pretrain")):
    return
  saved = json.loads(saved_path.read_text())
  fields = RUN_SHAPE
  if config.stage in ("pretrain", "all"):  # the data too: theirs and ours name it
    for name in (saved.get("data", {}).get("source"), config.data.source):
      source = sources.SOURCES.get(name)
      fields += tuple(f for f in (source.defining_fields if source else ()) if f not in fields)
  diffs = []
  for key in fields:
    section, name = key.split(".")
    was, now = saved.get(section, {}).get(name), config[section][name]
    if was is not None and was != now:
      diffs.append(f"{key}={was!r} (this config: {now!r})")
  if diffs:
    raise config_lib.UserError(
        f"The run in {workdir_lib.path(workdir)} was pretrained with {', '.join(diffs)} (its "
        f"config.pretrain.json): give --workdir={workdir} alone to run with its config "
        "(overrides still apply), or use a new --workdir.")
