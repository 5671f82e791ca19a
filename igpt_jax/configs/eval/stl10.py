"""STL-10 as in the paper: linear probe (stage probe, the default) or fine-tuning (stage finetune)
of a released model (--config.init_from) or one of your own (--workdir of its pretraining).

The paper's iGPT-L: linear probe 95.5% (Table 1), fine-tuned 97.1% (Table 2); no S or M figure.
STL-10's 96x96 images are resized to the released models' 32x32.
The argument after ':' is the model size, s, m or l (default l):

    python -m igpt_jax.main --config=eval/stl10:l --workdir=runs/stl10_l \
        --config.init_from=models/l/model.ckpt-1000000
"""
from igpt_jax import paper


def get_config(size="l"):
  return paper.eval_config("stl10", size)
