"""The stages the CLI runs, one module each, named as `--config.stage` names them.

Each is thin: read the workdir, call the library, write outputs, return the stage's JSON
result. Stages may call each other (pretrain fits a palette first when there is none); library
modules never import a stage.
"""

import importlib

import numpy as np

from igpt_jax import config as config_lib
from igpt_jax import distributed
from igpt_jax import palette as palette_lib
from igpt_jax import released
from igpt_jax import workdir as workdir_lib

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
