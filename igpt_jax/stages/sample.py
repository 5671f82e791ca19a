"""Stage sample: unconditional samples and completions of test images."""

from igpt_jax import sample


def run(config, workdir, log=print) -> dict:
  return sample.run(config, workdir, log=log)
