"""Stage finetune: the pretrained model plus a class head, trained with L_CLF (+ L_GEN)."""

from igpt_jax import loop
from igpt_jax import train as train_lib
from igpt_jax.stages import prepare


def run(config, workdir, log=print, stop_after: int | None = None) -> dict:
  train_lib.check_fits_devices(config, "finetune")
  config = prepare.resolved(config, workdir, log=log)
  return loop.finetune(config, workdir, log=log, stop_after=stop_after)
