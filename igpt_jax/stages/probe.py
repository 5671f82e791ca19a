"""Stage probe: linear probes on every layer's pooled features (see igpt_jax/probe.py)."""

from igpt_jax import probe


def run(config, workdir, log=print) -> dict:
  return probe.run(config, workdir, log=log)
