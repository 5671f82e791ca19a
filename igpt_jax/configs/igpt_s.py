"""iGPT-S: 24 layers, d=512, 8 heads, 32x32 ImageNet; 76,571,648 parameters.

Reference slice: v5litepod-16 (16 TPU v5e chips, 4 hosts). As shipped -- data parallel, bfloat16
compute, batch 128 in 2 micro-batches -- the TPU compiler puts the step at 9.98 GiB of a chip's
16 GiB (`--config.stage=plan --config.plan.target=v5litepod-16`; tests/test_plan.py checks it).
"""
from igpt_jax.config import base_config


def get_config():
  c = base_config()
  c.model.num_layers, c.model.d_model, c.model.num_heads = 24, 512, 8
  c.train.lr = 3e-3
  c.model.dtype = "bfloat16"
  c.train.accum_steps = 2  # 8 rows per chip at once run out of HBM (attention scores)
  return c
