"""iGPT-L: 48 layers, d=1536, 16 heads, 32x32 ImageNet; 1,362,250,752 parameters.

Reference slice: v5litepod-64 (64 TPU v5e chips, 16 hosts). As shipped -- ZeRO-3 over all chips
(fsdp), splash attention (model.attention='auto' on a TPU), bfloat16 compute, no remat, batch
128 at once -- the TPU compiler puts the step at 10.92 GiB of a chip's 16 GiB, roofline MFU 84%
(HBM bound; `--config.stage=plan --config.plan.target=v5litepod-64`; tests/test_plan.py checks
it). With XLA's attention: 2 micro-batches, 10.25 GiB, 29%. Pure data parallelism does not fit:
replicated parameters, gradients and Adam state alone are 20 GiB.
"""
from igpt_jax.config import base_config


def get_config():
  c = base_config()
  c.model.num_layers, c.model.d_model, c.model.num_heads = 48, 1536, 16
  c.train.lr = 1e-3
  c.model.dtype = "bfloat16"
  c.mesh.data, c.mesh.fsdp = 1, -1
  c.train.accum_steps = 1
  c.probe.select_examples = 50_000  # layers chosen on a subsample: see probe.select_examples
  return c
