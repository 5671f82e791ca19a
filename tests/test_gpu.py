"""GPU-only options (cuDNN flash attention), checked against the XLA path on a GPU.

Skipped where there is no GPU (CI). Run on a GPU machine with
  JAX_PLATFORMS=cuda,cpu python -m pytest -q tests/test_gpu.py
"""
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from igpt_jax import objectives
from igpt_jax.model import ImageGPT, ModelConfig


def _has_gpu():
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


pytestmark = pytest.mark.skipif(not _has_gpu(), reason="needs a GPU")


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_cudnn_attention_matches_xla(objective):
  cfg = ModelConfig(num_layers=2, d_model=128, num_heads=2, vocab_size=512, seq_len=256,
                    objective=objective, dtype="bfloat16")
  model = ImageGPT(cfg, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
  x = jax.random.randint(jax.random.key(2), (4, cfg.seq_len), 0, cfg.vocab_size)
  mask = None if cfg.causal else objectives.bert_mask(jax.random.key(3), x.shape)

  def loss_and_grads(c):
    gd = nnx.graphdef(ImageGPT(c, rngs=nnx.Rngs(0)))
    def fn(p):
      logits = nnx.merge(gd, p)(x, mask)
      return (objectives.ar_loss(logits, x) if mask is None
              else objectives.bert_loss(logits, x, mask))
    return jax.jit(jax.value_and_grad(fn))(params)

  loss, grads = loss_and_grads(cfg)
  loss_c, grads_c = loss_and_grads(dataclasses.replace(cfg, attention="cudnn"))
  assert abs(float(loss_c) / float(loss) - 1) < 1e-2
  for a, b in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads), strict=True):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.linalg.norm(a - b) <= 0.05 * np.linalg.norm(b) + 1e-6
