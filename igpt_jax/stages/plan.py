"""Stage plan: sizes the model and compiles its train step, allocating nothing: for this
machine's devices, plan.num_devices simulated CPUs, or a named accelerator (plan.target) with
its own compiler; see igpt_jax/plan.py."""

from igpt_jax import plan


def run(config, workdir, log=print) -> dict:
  del workdir  # a plan writes nothing
  return plan.run(config, log=log)
