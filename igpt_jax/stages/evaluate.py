"""Stage evaluate: bits/dim of the pretrained model on the validation and test splits."""

from igpt_jax import loop


def run(config, workdir, log=print) -> dict:
  return loop.evaluate_stage(config, workdir, log=log)
