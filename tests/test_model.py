"""The ImageGPT decoder: sizes, masking, one-pass features, cached decoding, numerics options."""
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import REPO
from igpt_jax import attention as attention_lib
from igpt_jax import stages
from igpt_jax import model as model_lib
from igpt_jax.config import load_config_file
from igpt_jax import objectives
from igpt_jax.model import ImageGPT, ModelConfig

TINY = ModelConfig(num_layers=3, d_model=32, num_heads=4, vocab_size=16, seq_len=20)


def load_config(name):
  return load_config_file(os.path.join(REPO, "configs", f"{name}.py"))


def randomise(model, seed=0, scale=0.3):
  """Moves every parameter off its initial value (the output head starts at zero)."""
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  state = nnx.state(model, nnx.Param)
  state = jax.tree.map(lambda x: x + scale * jax.random.normal(next(keys), x.shape), state)
  nnx.update(model, state)
  return model


def tokens(cfg, batch=3, seed=1):
  return jax.random.randint(jax.random.key(seed), (batch, cfg.seq_len), 0, cfg.vocab_size)


@pytest.mark.parametrize("name,expected", [("igpt_s", 76_571_648), ("igpt_m", 455_157_760)])
def test_paper_sizes_exact(name, expected):
  config = load_config(name)
  config.stage, config.plan.search = "plan", False  # sizes only: no search on this machine
  assert stages.get("plan")(config, "")["params"] == expected


def test_plan_stage_cli_prints_json_last_line():
  """The acceptance path: the CLI, abstract build, exact count for L and XL within 0.5%."""
  out = {}
  for name in ("igpt_l", "igpt_xl"):
    proc = subprocess.run(
        [sys.executable, "-m", "igpt_jax.main", f"--config={REPO}/configs/{name}.py",
         "--config.stage=plan", "--config.plan.search=false"], capture_output=True, text=True,
        cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["igpt_l"]["params"] == 1_362_250_752
  assert abs(out["igpt_xl"]["params"] / 6801e6 - 1) < 0.005
  assert out["igpt_l"]["flops_per_token"] > 6 * out["igpt_l"]["params"] * 0.9


def test_flops_convention():
  cfg = TINY
  n_matmul = cfg.num_layers * 12 * cfg.d_model ** 2 + cfg.vocab_size * cfg.d_model
  assert model_lib.flops_per_token(cfg) == 6 * n_matmul + 6 * cfg.num_layers * cfg.d_model * cfg.seq_len


def test_untrained_loss_is_uniform_and_one_step_lowers_it():
  cfg = ModelConfig(num_layers=2, d_model=64, num_heads=4, vocab_size=512, seq_len=64)
  model = ImageGPT(cfg, rngs=nnx.Rngs(0))
  batch = jax.random.randint(jax.random.key(0), (8, cfg.seq_len), 0, 512)
  graphdef, params = nnx.split(model, nnx.Param)

  @jax.jit
  def loss_fn(p):
    return objectives.ar_loss(nnx.merge(graphdef, p)(batch), batch)

  loss0 = float(loss_fn(params))
  assert abs(loss0 / math.log(512) - 1) < 0.02
  opt = optax.adamw(1e-3, b1=0.9, b2=0.95)
  grads = jax.grad(loss_fn)(params)
  updates, _ = opt.update(grads, opt.init(params), params)
  loss1 = float(loss_fn(optax.apply_updates(params, updates)))
  assert loss1 < loss0 - 1e-3, (loss0, loss1)


def test_ar_is_causal_and_shifted():
  model = randomise(ImageGPT(TINY, rngs=nnx.Rngs(0)))
  x = tokens(TINY)
  j = 7
  y = x.at[:, j].set((x[:, j] + 1) % TINY.vocab_size)
  lx, ly = model(x), model(y)
  # Position i predicts token i from tokens[:i]: changing token j moves only positions > j.
  np.testing.assert_allclose(lx[:, : j + 1], ly[:, : j + 1], atol=1e-6)
  assert float(jnp.max(jnp.abs(lx[:, j + 1] - ly[:, j + 1]))) > 1e-4


def test_bert_sees_everything_but_masked_tokens():
  cfg = ModelConfig(num_layers=2, d_model=32, num_heads=4, vocab_size=16, seq_len=20,
                    objective="bert")
  model = randomise(ImageGPT(cfg, rngs=nnx.Rngs(0)))
  assert not hasattr(model, "sos")
  x = tokens(cfg)
  mask = jnp.zeros(x.shape, bool).at[:, 5].set(True)
  y = x.at[:, 5].set((x[:, 5] + 3) % cfg.vocab_size)
  # A masked token's value is invisible: its embedding is zeroed.
  np.testing.assert_allclose(model(x, mask), model(y, mask), atol=1e-6)
  # Without the mask, attention is bidirectional: position 0 sees token 5.
  assert float(jnp.max(jnp.abs(model(x)[:, 0] - model(y)[:, 0]))) > 1e-4


def test_one_pass_features_equal_per_layer_forward():
  model = randomise(ImageGPT(TINY, rngs=nnx.Rngs(0)))
  x = tokens(TINY)
  feats = model.features(x)
  assert feats.shape == (TINY.num_layers, x.shape[0], TINY.d_model)
  graphdef, stacked = nnx.split(model.blocks)
  h = model.embed(x)
  for layer in range(TINY.num_layers):
    block = nnx.merge(graphdef, jax.tree.map(lambda a: a[layer], stacked))
    h = block(h)
    expected = jnp.mean(model_lib.rms_norm(h), axis=1)
    np.testing.assert_allclose(feats[layer], expected, rtol=1e-5, atol=1e-6)


def test_class_head_pools_final_norm():
  cfg = ModelConfig(num_layers=2, d_model=32, num_heads=4, vocab_size=16, seq_len=20, num_classes=5)
  model = ImageGPT(cfg, rngs=nnx.Rngs(0))
  x = tokens(cfg)
  logits, class_logits = model.logits_and_class_logits(x)
  assert class_logits.shape == (3, 5)
  np.testing.assert_array_equal(class_logits, 0.0)  # zero-initialised head, as released
  np.testing.assert_allclose(logits, model(x), atol=1e-6)
  with pytest.raises(ValueError, match="no class head"):
    ImageGPT(TINY, rngs=nnx.Rngs(0)).logits_and_class_logits(x)


def test_cached_decoding_matches_full_forward():
  model = randomise(ImageGPT(TINY, rngs=nnx.Rngs(0)))
  x = tokens(TINY)
  full = model(x)
  inputs = jnp.concatenate([jnp.full((x.shape[0], 1), TINY.vocab_size), x[:, :-1]], axis=1)
  cache = model.init_cache(x.shape[0])
  prefix = 6
  out, cache = model.decode(inputs[:, :prefix], cache, 0)  # prefill in one pass
  outs = [out]
  step = jax.jit(lambda ids, c, i: model.decode(ids, c, i))
  for i in range(prefix, TINY.seq_len):
    out, cache = step(inputs[:, i:i + 1], cache, i)
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)


def loss_and_grads(cfg, seed=0):
  model = randomise(ImageGPT(cfg, rngs=nnx.Rngs(seed)))
  graphdef, params = nnx.split(model, nnx.Param)
  x = tokens(cfg, batch=4)
  fn = lambda p: objectives.ar_loss(nnx.merge(graphdef, p)(x), x)
  return jax.jit(jax.value_and_grad(fn))(params)  # one compile, not one per eager op


@pytest.mark.parametrize("remat", ["full", "dots_with_no_batch_dims_saveable"])
def test_remat_policies_change_nothing_numerically(remat):
  loss, grads = loss_and_grads(TINY)
  loss_r, grads_r = loss_and_grads(dataclasses.replace(TINY, remat=remat))
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("option", [dict(fused_qkv=True), dict(fused_qkv=True, use_bias=True),
                                    dict(scan_layers=False),
                                    dict(scan_layers=False, fused_qkv=True, remat="full")])
def test_speed_options_change_nothing_numerically(option):
  """Each switch in the speed work computes the same function as the default path."""
  base = dataclasses.replace(TINY, use_bias=option.get("use_bias", False))
  loss, grads = loss_and_grads(base)
  loss_o, grads_o = loss_and_grads(dataclasses.replace(TINY, **option))
  np.testing.assert_allclose(loss_o, loss, rtol=1e-6)
  assert jax.tree.structure(grads_o) == jax.tree.structure(grads)  # same checkpoint layout
  for a, b in zip(jax.tree.leaves(grads_o), jax.tree.leaves(grads), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_blocked_causal_attention_equals_full_attention():
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 16, 3, 8)) for i in range(3))
  def loss(fn):
    return jax.value_and_grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v))), argnums=(0, 1, 2))
  full, grads = jax.jit(loss(lambda q, k, v: attention_lib.xla_attention(q, k, v, causal=True)))(
      q, k, v)
  blocked, grads_b = jax.jit(loss(lambda q, k, v: attention_lib.blocked_causal_attention(
      q, k, v, 4)))(q, k, v)
  np.testing.assert_allclose(blocked, full, rtol=1e-5)
  for a, b in zip(grads_b, grads, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_blocked_attention_option_matches_xla_model():
  cfg = ModelConfig(num_layers=2, d_model=16, num_heads=2, vocab_size=16, seq_len=256,
                    attention="xla")
  loss, grads = loss_and_grads(cfg)  # 256 tokens: two blocks of 128
  loss_b, grads_b = loss_and_grads(dataclasses.replace(cfg, attention="blocked"))
  np.testing.assert_allclose(loss_b, loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_b), jax.tree.leaves(grads), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_unrolled_layers_give_the_same_probe_features():
  model = randomise(ImageGPT(TINY, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model, nnx.Param)
  unrolled = nnx.merge(nnx.graphdef(ImageGPT(dataclasses.replace(TINY, scan_layers=False),
                                             rngs=nnx.Rngs(0))), params)
  x = tokens(TINY, batch=3)
  np.testing.assert_allclose(unrolled.features(x), model.features(x), rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_close_loss():
  loss, _ = loss_and_grads(TINY)
  cfg16 = dataclasses.replace(TINY, dtype="bfloat16")
  loss16, grads16 = loss_and_grads(cfg16)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads16))
  assert abs(float(loss16) / float(loss) - 1) < 0.02


def test_bad_shapes_fail_clearly():
  with pytest.raises(ValueError, match="divisible"):
    ModelConfig(d_model=30, num_heads=4)
  with pytest.raises(ValueError, match="attention"):
    ModelConfig(attention="flash")
  with pytest.raises(ValueError, match="remat"):
    ModelConfig(remat="sometimes")
  with pytest.raises(ValueError, match="needs model.dtype='bfloat16'"):
    ModelConfig(attention="cudnn")


def test_scan_keeps_compile_time_flat_in_depth():
  def compile_seconds(layers):
    cfg = ModelConfig(num_layers=layers, d_model=16, num_heads=2, vocab_size=16, seq_len=16)
    graphdef, params = nnx.split(model_lib.abstract_model(cfg), nnx.Param)
    x = jax.ShapeDtypeStruct((2, cfg.seq_len), jnp.int32)

    def loss(p, x):
      return objectives.ar_loss(nnx.merge(graphdef, p)(x), x)

    start = time.perf_counter()
    jax.jit(jax.value_and_grad(loss)).lower(params, x).compile()
    return time.perf_counter() - start

  compile_seconds(2)  # warm up tracing caches shared by both
  t6, t48 = compile_seconds(6), compile_seconds(48)
  print(f"compile time: 6 layers {t6:.3f}s, 48 layers {t48:.3f}s, ratio {t48 / t6:.2f}")
  assert t48 < 2 * t6
