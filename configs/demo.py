"""A small iGPT on Fashion-MNIST that pretrains on 2 CPU cores in minutes (what `make demo` runs).

Grayscale 14x14 images, a 16-level palette, 6 layers of width 128.
"""
from igpt_jax.config import base_config


def get_config():
  c = base_config()
  c.stage = "all"
  c.data.source = "fashion_mnist"
  c.data.name = "fashion_mnist"
  c.data.resolution = 14
  c.data.channels = 1
  c.palette.k = 16
  c.model.num_layers, c.model.d_model, c.model.num_heads = 6, 128, 4
  c.train.steps = 300
  c.train.batch_size = 64
  c.train.lr = 3e-3
  c.train.warmup_steps = 30
  c.train.log_every = 10
  c.train.eval_every = 100
  c.checkpoint.every = 100
  return c
