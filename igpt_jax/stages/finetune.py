"""Stage finetune: the pretrained model plus a class head, trained with L_CLF (+ L_GEN)."""

from igpt_jax import loop


def run(config, workdir, log=print, stop_after: int | None = None) -> dict:
  return loop.finetune(config, workdir, log=log, stop_after=stop_after)
