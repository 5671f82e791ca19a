"""CIFAR-10 as in the paper: linear probe (stage probe, the default) or fine-tuning (stage finetune)
of a released model (--config.init_from) or one of your own (--workdir of its pretraining).

The paper's iGPT-L: linear probe 96.3% (Table 1), fine-tuned 99.0% (Table 2); no S or M figure.
Low-data probes (probe.labels_per_class='4,25,400', 5 draws): the paper's iGPT-L reaches 73.2 +- 1.5,
87.6 +- 0.6 and 94.3 +- 0.1 with 4, 25 and 400 labels per class (Table 4).
The argument after ':' is the model size, s, m or l (default l):

    python -m igpt_jax.main --config=eval/cifar10:l --workdir=runs/cifar10_l \
        --config.init_from=models/l/model.ckpt-1000000
"""
from igpt_jax import paper


def get_config(size="l"):
  return paper.eval_config("cifar10", size)
