"""iGPT-S: 24 layers, d=512, 8 heads, 32x32 ImageNet; 76,571,648 parameters.

Reference slice: v5litepod-16 (16 TPU v5e chips, 4 hosts). As shipped -- data parallel, splash
attention (model.attention='auto' on a TPU), bfloat16 compute, no remat, batch 128 at once --
the TPU compiler puts the step at 8.96 GiB of a chip's 16 GiB, roofline MFU 35% (HBM bound;
`--config.stage=plan --config.plan.target=v5litepod-16`; tests/test_plan.py checks it). With
XLA's attention the scores need 2 micro-batches (9.98 GiB) and the roofline is 17%.
"""
from igpt_jax.config import base_config


def get_config():
  c = base_config()
  c.model.num_layers, c.model.d_model, c.model.num_heads = 24, 512, 8
  c.train.lr = 3e-3
  c.model.dtype = "bfloat16"
  c.train.accum_steps = 1  # 8 rows per chip at once: splash keeps the scores off HBM
  return c
