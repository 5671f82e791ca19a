"""iGPT-XL: 60 layers, d=3072, 24 heads, 64x64 ImageNet; 6,810,875,904 parameters (paper: 6801M).

The paper trained XL at batch 64 for 2M steps; batch 128 here keeps the sizes comparable.

Reference slice: v5p-256 (128 TPU v5p chips, 32 hosts). As shipped -- ZeRO-3 over all 128 chips,
splash attention (model.attention='auto' on a TPU), bfloat16 compute, no remat, batch 128 at
once (one image per chip) -- the TPU compiler puts the step at 51.3 GiB of a chip's 95 GiB,
roofline MFU 93% (compute bound; `--config.stage=plan --config.plan.target=v5p-256`;
tests/test_plan.py checks it). With XLA's attention the 4096-token scores needed fsdp=32 x
tensor=4 in 4 micro-batches (62.9 GiB).
"""
from igpt_jax.config import base_config


def get_config():
  c = base_config()
  c.model.num_layers, c.model.d_model, c.model.num_heads = 60, 3072, 24
  c.data.name = "imagenet_resized/64x64"
  c.data.resolution = 64
  c.train.lr = 5e-4
  c.model.dtype = "bfloat16"
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.train.accum_steps = 1
  c.probe.concat = 5  # the paper's multi-layer probe for XL
  c.probe.select_examples = 50_000  # layers chosen on a subsample: see probe.select_examples
  return c
