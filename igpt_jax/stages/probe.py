"""Stage probe: linear probes on every layer's pooled features (see igpt_jax/probe.py)."""

from igpt_jax import probe
from igpt_jax.stages import prepare


def run(config, workdir, log=print) -> dict:
  config = prepare.resolved(config, workdir, log=log)
  return probe.run(config, workdir, log=log)
