"""Stage pretrain: L_AR or L_BERT on the pretraining split (the palette is fitted first if the
workdir has none); resumes from the newest intact checkpoint."""

from igpt_jax import loop
from igpt_jax import train as train_lib
from igpt_jax.stages import fit_palette, prepare


def run(config, workdir, log=print, stop_after: int | None = None) -> dict:
  train_lib.check_fits_devices(config, "pretrain")  # a mesh typo before minutes of k-means
  config = prepare.resolved(config, workdir, log=log)
  fit_palette.ensure(config, workdir, log=log)
  return loop.pretrain(config, workdir, log=log, stop_after=stop_after)
