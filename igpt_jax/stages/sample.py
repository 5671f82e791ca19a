"""Stage sample: unconditional samples and completions of test images."""

from igpt_jax import sample
from igpt_jax.stages import prepare


def run(config, workdir, log=print) -> dict:
  config = prepare.resolved(config, workdir, log=log)
  return sample.run(config, workdir, log=log)
