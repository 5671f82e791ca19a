"""Attention implementations: splash (Pallas, run by its interpreter on CPU) against plain XLA,
alone and inside the sharded train step; what `auto` picks per platform; the FLOPs the plan adds
for a kernel the compiler cannot see into; named remat policies."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from igpt_jax import attention as attention_lib
from igpt_jax import model as model_lib
from igpt_jax import remat as remat_lib
from igpt_jax import sharding as sharding_lib
from igpt_jax import train as train_lib
from igpt_jax.config import UserError, validate
from test_model import load_config, loss_and_grads

BLOCKS = attention_lib.SplashBlocks(128, 128)  # 256 tokens: two tiles each way


def fsdp_x_tensor():
  return sharding_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=2, tensor=2)),
                                jax.devices()[:4])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_splash_matches_xla_attention_values_and_gradients(causal):
  q, k, v = (jax.random.normal(jax.random.key(i), (4, 256, 4, 32)) for i in range(3))

  def value_and_grads(impl):
    def f(q, k, v):
      out = attention_lib.attention(q, k, v, causal=causal, impl=impl, splash_blocks=BLOCKS)
      return jnp.sum(out * jnp.sin(out))
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)

  expected, grads = value_and_grads("xla")
  with sharding_lib.activation_sharding(fsdp_x_tensor()):  # batch over fsdp, heads over tensor
    got, grads_s = value_and_grads("splash")
    text = jax.jit(lambda q, k, v: attention_lib.attention(
        q, k, v, causal=causal, impl="splash", splash_blocks=BLOCKS)).lower(q, k, v).as_text()
  assert "manual_computation" in text  # the kernel ran per device, inside shard_map
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  for a, b in zip(grads_s, grads, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_splash_and_xla_train_alike_on_fsdp_x_tensor(objective):
  """3 steps of a tiny model at 16x16 (256 tokens) on 4 simulated devices, fsdp 2 x tensor 2."""
  config = load_config("demo")
  config.data.resolution, config.palette.k = 16, 16
  config.model.num_layers, config.model.d_model, config.model.num_heads = 2, 32, 4
  config.model.objective = objective
  config.model.splash_block_q = config.model.splash_block_kv = 128
  config.train.update(batch_size=8, warmup_steps=1, lr=3e-3)
  config.mesh.update(data=1, fsdp=2, tensor=2)
  tokens = jax.random.randint(jax.random.key(0), (3, 8, 256), 0, 16)

  def losses(impl):
    config.model.attention = impl
    cfg = model_lib.ModelConfig.from_config(config)
    trainer = train_lib.Trainer(cfg, config, fsdp_x_tensor(), sharding_lib.DEFAULT_RULES)
    step, state, out = trainer.compile_step(), trainer.init_state(0), []
    for i in range(3):
      state, metrics = step(state, {"tokens": jax.device_put(tokens[i], trainer.batch_sharding)})
      out.append(float(metrics["loss"]))
    return np.array(out)

  xla, splash = losses("xla"), losses("splash")
  np.testing.assert_allclose(splash, xla, rtol=1e-4)
  assert xla[-1] != xla[0]  # the steps trained


def test_auto_is_the_platforms_best():
  resolve = attention_lib.resolve
  assert resolve("auto", "tpu", "bfloat16", 1024) == "splash"
  assert resolve("auto", "tpu", "bfloat16", 64) == "xla"  # under one 128-token tile
  assert resolve("auto", "gpu", "bfloat16", 1024) == "cudnn"
  assert resolve("auto", "gpu", "float32", 1024) == "xla"  # cuDNN flash needs 16-bit
  assert resolve("auto", "cpu", "float32", 1024) == "blocked"
  assert resolve("xla", "tpu") == "xla"  # a named implementation is kept
  assert attention_lib.resolve("auto") == "blocked"  # this machine, no mesh: JAX's CPU backend
  cfg = model_lib.ModelConfig(seq_len=1024, dtype="bfloat16")
  assert cfg.attention == "auto" and cfg.attention_on("tpu") == "splash (auto on tpu)"
  for name in ("igpt_s", "igpt_m", "igpt_l", "igpt_xl", "demo"):
    assert load_config(name).model.attention == "auto", name


def test_splash_tiles_must_fit_the_sequence():
  with pytest.raises(ValueError, match="multiple of 128"):
    model_lib.ModelConfig(seq_len=64, attention="splash")
  config = load_config("demo")
  config.stage, config.model.attention, config.data.resolution = "pretrain", "splash", 8
  with pytest.raises(UserError, match="splash_block_q"):
    validate(config)


def test_causal_kernel_visits_the_diagonal_blocks_too():
  fraction = attention_lib.causal_block_fraction
  assert fraction(1024, 512, 512) == 0.75  # 3 of 4 blocks
  assert fraction(1024, 128, 128) == (8 * 9 / 2) / 64
  assert fraction(1024, 1024, 1024) == 1.0
  assert fraction(4096, 512, 256) == pytest.approx(sum(min(2 * (i + 1), 16) for i in range(8))
                                                   / (8 * 16))


def test_named_remat_policies_change_nothing_numerically():
  tiny = model_lib.ModelConfig(num_layers=2, d_model=16, num_heads=2, vocab_size=16, seq_len=16)
  loss, grads = loss_and_grads(tiny)
  for remat in ("save:query,key,value,attention_out", "save:mlp_hidden"):
    loss_r, grads_r = loss_and_grads(dataclasses.replace(tiny, remat=remat))
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="unknown activation names"):
    model_lib.ModelConfig(remat="save:queries")


def test_named_remat_saves_what_it_names(capsys):
  """`save:attention_out` keeps the attention output for the backward pass; `full` keeps none."""
  cfg = model_lib.ModelConfig(num_layers=2, d_model=32, num_heads=2, vocab_size=16, seq_len=64,
                              attention="xla")

  def saved(remat):
    c = dataclasses.replace(cfg, remat=remat)
    model = model_lib.ImageGPT(c, rngs=nnx.Rngs(0))
    h = model.embed(jnp.zeros((2, 64), jnp.int32))
    block = model.unstacked_blocks()[0]
    f = jax.checkpoint(lambda x: block(x), policy=remat_lib.remat_policy(remat)[1])
    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(f, h)
    return capsys.readouterr().out.splitlines()

  assert any("attention_out" in line for line in saved("save:attention_out"))
  assert not any("attention_out" in line for line in saved("full"))
