"""iGPT-XL: 60 layers, d=3072, 24 heads, 64x64 ImageNet; 6,810,875,904 parameters (paper: 6801M).

The paper trained XL at batch 64 for 2M steps; batch 128 here keeps the sizes comparable.
"""
from igpt_jax.config import base_config


def get_config():
  c = base_config()
  c.model.num_layers, c.model.d_model, c.model.num_heads = 60, 3072, 24
  c.data.name = "imagenet_resized/64x64"
  c.data.resolution = 64
  c.train.lr = 5e-4
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  # ZeRO-3 over most devices plus 2-way tensor parallelism: batch 128 still splits evenly on a
  # 256-chip slice (fsdp=128, tensor=2).
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 2
  c.probe.concat = 5  # the paper's multi-layer probe for XL
  return c
