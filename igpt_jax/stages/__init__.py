"""The stages the CLI runs, one module each, named as `--config.stage` names them.

Each is thin: read the workdir, call the library, write outputs, return the stage's JSON
result. Stages may call each other (pretrain fits a palette first when there is none); library
modules never import a stage.
"""

import importlib

NAMES = ("prepare", "fit_palette", "pretrain", "evaluate", "probe", "finetune", "sample", "plan",
         "all")


def get(name: str):
  """The `run(config, workdir, log)` of stage `name`."""
  return importlib.import_module(f"igpt_jax.stages.{name}").run
