"""CIFAR-100 as in the paper: linear probe (stage probe, the default) or fine-tuning (stage finetune)
of a released model (--config.init_from) or one of your own (--workdir of its pretraining).

The paper's iGPT-L: linear probe 82.8% (Table 1), fine-tuned 88.5% (Table 2); no S or M figure.
The argument after ':' is the model size, s, m or l (default l):

    python -m igpt_jax.main --config=eval/cifar100:l --workdir=runs/cifar100_l \
        --config.init_from=models/l/model.ckpt-1000000
"""
from igpt_jax import paper


def get_config(size="l"):
  return paper.eval_config("cifar100", size)
