"""iGPT-M: 36 layers, d=1024, 8 heads, 32x32 ImageNet; 455,157,760 parameters.

Reference slice: v5litepod-32 (32 TPU v5e chips, 8 hosts). As shipped -- ZeRO-3 over all chips
(fsdp), splash attention (model.attention='auto' on a TPU), bfloat16 compute, no remat, batch
128 at once -- the TPU compiler puts the step at 10.27 GiB of a chip's 16 GiB, roofline MFU 56%
(HBM bound; `--config.stage=plan --config.plan.target=v5litepod-32`; tests/test_plan.py checks
it). With XLA's attention: 2 micro-batches, 8.66 GiB, 28%.
"""
from igpt_jax.config import base_config


def get_config():
  c = base_config()
  c.model.num_layers, c.model.d_model, c.model.num_heads = 36, 1024, 8
  c.train.lr = 2e-3
  c.model.dtype = "bfloat16"
  c.mesh.data, c.mesh.fsdp = 1, -1
  c.train.accum_steps = 1
  return c
