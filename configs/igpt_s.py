"""iGPT-S: 24 layers, d=512, 8 heads, 32x32 ImageNet; 76,571,648 parameters."""
from igpt_jax.config import base_config


def get_config():
  c = base_config()
  c.model.num_layers, c.model.d_model, c.model.num_heads = 24, 512, 8
  c.train.lr = 3e-3
  return c
