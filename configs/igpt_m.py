"""iGPT-M: 36 layers, d=1024, 8 heads, 32x32 ImageNet; 455,157,760 parameters."""
from igpt_jax.config import base_config


def get_config():
  c = base_config()
  c.model.num_layers, c.model.d_model, c.model.num_heads = 36, 1024, 8
  c.train.lr = 2e-3
  return c
