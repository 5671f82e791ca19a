"""iGPT-L: 48 layers, d=1536, 16 heads, 32x32 ImageNet; 1,362,250,752 parameters."""
from igpt_jax.config import base_config


def get_config():
  c = base_config()
  c.model.num_layers, c.model.d_model, c.model.num_heads = 48, 1536, 16
  c.train.lr = 1e-3
  c.model.dtype = "bfloat16"
  return c
