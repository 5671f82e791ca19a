"""Stage evaluate: bits/dim of the pretrained model on the validation and test splits."""

from igpt_jax import loop
from igpt_jax.stages import prepare


def run(config, workdir, log=print) -> dict:
  config = prepare.resolved(config, workdir, log=log)
  return loop.evaluate_stage(config, workdir, log=log)
