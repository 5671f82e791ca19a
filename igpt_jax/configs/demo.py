"""A small iGPT on Fashion-MNIST: the whole pipeline on 2 CPU cores in under 20 minutes.

What `make demo` runs (stage all): fit a 16-level gray palette, pretrain 4 layers of width 128 on
14x14 images, evaluate bits/dim on the 10k test images, probe every layer (5k train / 5k test
images, against raw pixels and a random-init model), fine-tune, sample. Sized for the time
budget, not for accuracy: raise train.steps for better features.
"""
from igpt_jax.config import base_config


def get_config():
  c = base_config()
  c.stage = "all"
  c.data.source = "fashion_mnist"
  c.data.name = "fashion_mnist"
  c.data.resolution = 14
  c.data.channels = 1
  c.data.augment = "none"  # 28-pixel images at 14: crops resized back would only blur them
  c.palette.k = 16
  c.palette.samples = 200_000
  c.model.num_layers, c.model.d_model, c.model.num_heads = 4, 128, 4
  c.train.steps = 200
  c.train.batch_size = 64
  c.train.lr = 3e-3
  c.train.warmup_steps = 20
  c.train.log_every = 10
  c.train.eval_every = 0  # the evaluate stage measures the whole test split afterwards
  c.train.sample_every = 100  # sample grids in TensorBoard at steps 100 and 200
  c.checkpoint.every = 50
  c.finetune.steps = 50
  c.finetune.warmup_steps = 5
  c.finetune.eval_every = 50
  c.finetune.eval_batches = 40  # 2,560 test images
  c.probe.train_examples = 5_000
  c.probe.test_examples = 5_000
  c.probe.validation_examples = 1_000  # chooses L2 and the best layer
  c.sample.num = 16
  c.sample.completions = 8
  return c
