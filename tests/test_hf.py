"""Weight interop: transformers' ImageGPT both ways, and OpenAI's original TF checkpoints."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import REPO
from igpt_jax import hf
from igpt_jax import model as model_lib
from test_model import randomise

transformers = pytest.importorskip("transformers")

SHAPES = [
    dict(n_layer=2, n_embd=32, n_head=4, n_positions=16, vocab_size=513),
    dict(n_layer=3, n_embd=48, n_head=3, n_positions=36, vocab_size=17, n_inner=100),
]


def hf_model(shape, seed):
  torch.manual_seed(seed)
  config = transformers.ImageGPTConfig(**shape, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  model = transformers.ImageGPTForCausalImageModeling(config).eval()
  with torch.no_grad():
    # Move every weight, bias and norm gain off its initial value, at a scale where activations
    # leave the near-linear regime: small-init weights would hide a wrong activation or norm.
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  return model


def hf_logits(model, tokens):
  sos = model.config.vocab_size - 1
  ids = np.concatenate([np.full((tokens.shape[0], 1), sos), tokens[:, :-1]], axis=1)
  with torch.no_grad():
    return model(torch.as_tensor(ids)).logits.numpy()


def random_tokens(cfg, batch=3, seed=0):
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, cfg.seq_len))


@pytest.mark.parametrize("shape", SHAPES)
def test_from_pretrained_matches_transformers(shape, tmp_path):
  reference = hf_model(shape, seed=0)
  reference.save_pretrained(tmp_path)
  cfg, model = hf.from_pretrained(str(tmp_path))
  assert cfg.use_bias and cfg.vocab_size == shape["vocab_size"] - 1
  x = random_tokens(cfg)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), hf_logits(reference, x), atol=1e-4)


def test_from_pretrained_reads_pytorch_bin(tmp_path):
  reference = hf_model(SHAPES[0], seed=1)
  reference.config.save_pretrained(tmp_path)
  torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
  cfg, model = hf.from_pretrained(str(tmp_path))
  x = random_tokens(cfg)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), hf_logits(reference, x), atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_save_pretrained_loads_in_transformers(shape, tmp_path):
  cfg = hf.config_from_hf({**shape, "model_type": "imagegpt"})
  model = randomise(model_lib.ImageGPT(cfg, rngs=nnx.Rngs(3)), scale=0.1)
  hf.save_pretrained(model, cfg, str(tmp_path))
  loaded = transformers.ImageGPTForCausalImageModeling.from_pretrained(tmp_path).eval()
  x = random_tokens(cfg, seed=4)
  np.testing.assert_allclose(hf_logits(loaded, x), np.asarray(model(jnp.asarray(x))), atol=1e-4)


def test_save_pretrained_without_biases(tmp_path):
  cfg = model_lib.ModelConfig(num_layers=2, d_model=32, num_heads=4, vocab_size=16, seq_len=16)
  model = randomise(model_lib.ImageGPT(cfg, rngs=nnx.Rngs(5)), scale=0.1)
  hf.save_pretrained(model, cfg, str(tmp_path))
  loaded = transformers.ImageGPTForCausalImageModeling.from_pretrained(tmp_path).eval()
  x = random_tokens(cfg)
  np.testing.assert_allclose(hf_logits(loaded, x), np.asarray(model(jnp.asarray(x))), atol=1e-4)


def test_missing_weights_fail_clearly(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "imagegpt", **SHAPES[0]}))
  with pytest.raises(FileNotFoundError, match="save_pretrained"):
    hf.from_pretrained(str(tmp_path))


# -- OpenAI checkpoints ------------------------------------------------------------------------

N_LAYER, N_EMBD, N_HEAD, N_CTX, N_VOCAB = 2, 32, 4, 16, 24


def openai_variables(bert, seed=0):
  """Random values under the exact names and shapes of openai/image-gpt's src/model.py."""
  rng = np.random.default_rng(seed)
  d, k = N_EMBD, N_EMBD // N_HEAD
  r = lambda *s: (0.3 * rng.standard_normal(s)).astype(np.float32)
  v = {"model/wte": r(N_VOCAB, d), "model/wpe": r(N_CTX, d), "model/wtet": r(N_VOCAB, d),
       "model/ln_f/g": 1 + r(d)}
  if not bert:
    v["model/sos"] = r(d)
  for i in range(N_LAYER):
    p = f"model/h{i}/"
    v.update({p + "ln_1/g": 1 + r(d), p + "ln_2/g": 1 + r(d),
              p + "attn/q_proj": r(N_HEAD, k, d), p + "attn/k_proj": r(N_HEAD, k, d),
              p + "attn/v_proj": r(N_HEAD, k, d), p + "attn/c_proj": r(N_HEAD, k, d),
              p + "mlp/c_fc/w": r(d, 4 * d), p + "mlp/c_proj/w": r(4 * d, d)})
  return v


def write_tf1_checkpoint(variables, prefix):
  import tensorflow as tf
  with tf.Graph().as_default():
    tf_vars = [tf.compat.v1.Variable(value, name=name) for name, value in variables.items()]
    # Optimiser slots, as in the released files; the importer must ignore them.
    tf_vars.append(tf.compat.v1.Variable(variables["model/wte"], name="model/wte/Adam"))
    saver = tf.compat.v1.train.Saver(tf_vars, sharded=True)
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      return saver.save(sess, prefix)


def release_forward(v, x, bert, keep=None):
  """A numpy transcription of the release's `model()` forward pass, for reference."""
  def norm(h, g):
    return h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + 1e-5) * g

  def softmax(w):
    w = w - w.max(-1, keepdims=True)
    return np.exp(w) / np.exp(w).sum(-1, keepdims=True)

  b, n = x.shape
  h = v["model/wte"][x]
  if bert:
    h = h * keep[..., None]
  else:
    h = np.concatenate([np.broadcast_to(v["model/sos"], (b, 1, N_EMBD)), h[:, :-1]], axis=1)
  h = h + v["model/wpe"][:n]
  for i in range(N_LAYER):
    p = f"model/h{i}/"
    a_in = norm(h, v[p + "ln_1/g"])
    q, k, val = (np.einsum("bsf,hef->bhse", a_in, v[p + f"attn/{m}_proj"]) for m in "qkv")
    w = q @ np.swapaxes(k, -1, -2) / np.sqrt(val.shape[-1])
    if not bert:
      mask = np.tril(np.ones((n, n), np.float32))
      w = w * mask - 1e10 * (1 - mask)
    a = np.einsum("bhse,hef->bsf", softmax(w) @ val, v[p + "attn/c_proj"])
    h = h + a
    m = norm(h, v[p + "ln_2/g"]) @ v[p + "mlp/c_fc/w"]
    h = h + (m / (1 + np.exp(-1.702 * m))) @ v[p + "mlp/c_proj/w"]
  return norm(h, v["model/ln_f/g"]) @ v["model/wtet"].T


@pytest.mark.parametrize("bert", [False, True])
def test_openai_checkpoint_matches_release_math(bert, tmp_path):
  variables = openai_variables(bert)
  write_tf1_checkpoint(variables, str(tmp_path / "model.ckpt"))
  cfg, model = hf.from_openai_checkpoint(str(tmp_path), N_LAYER, N_EMBD, N_HEAD)
  assert cfg.objective == ("bert" if bert else "ar")
  x = np.random.default_rng(1).integers(0, N_VOCAB, (2, N_CTX))
  keep = None
  if bert:
    keep = (np.random.default_rng(2).random((2, N_CTX)) > 0.15).astype(np.float32)
    ours = model(jnp.asarray(x), jnp.asarray(keep == 0))
  else:
    ours = model(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(ours), release_forward(variables, x, bert, keep),
                             rtol=1e-4, atol=1e-4)


def test_openai_to_hf_cli(tmp_path):
  variables = openai_variables(bert=False, seed=3)
  (tmp_path / "ckpt").mkdir()
  prefix = write_tf1_checkpoint(variables, str(tmp_path / "ckpt" / "model.ckpt-1000"))
  out = tmp_path / "hf"
  proc = subprocess.run([sys.executable, "-m", "igpt_jax.hf", "openai-to-hf", prefix, str(out),
                         "--n_layer", str(N_LAYER), "--n_embd", str(N_EMBD),
                         "--n_head", str(N_HEAD)], capture_output=True, text=True, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-2000:]
  loaded = transformers.ImageGPTForCausalImageModeling.from_pretrained(out).eval()
  x = np.random.default_rng(5).integers(0, N_VOCAB, (2, N_CTX))
  np.testing.assert_allclose(hf_logits(loaded, x), release_forward(variables, x, bert=False),
                             rtol=1e-4, atol=1e-4)
