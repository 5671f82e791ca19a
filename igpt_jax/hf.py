"""Pretrained iGPT weights in and out: Hugging Face `transformers` directories and OpenAI's
original TensorFlow checkpoints.

  config, model = hf.from_pretrained("path/to/imagegpt-small")      # a save_pretrained directory
  hf.save_pretrained(model, config, "path/out")                      # transformers loads it back
  config, model = hf.from_openai_checkpoint("model.ckpt-1000000", n_layer=24, n_embd=512, n_head=8)

Layouts. transformers stores the start token as row `vocab` of `wte` and Conv1D weights as
[in, out], with q, k, v fused in `c_attn`. OpenAI's release stores q/k/v/c_proj as
[heads, head_dim, d] and the start token as `sos`. Ours keeps projections as [d, heads, head_dim]
and [heads, head_dim, d], stacked over layers (see model.py).

Python API; also `python -m igpt_jax.hf openai-to-hf CKPT OUT_DIR --n_layer .. --n_embd .. --n_head ..`.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from igpt_jax import model as model_lib
from igpt_jax import named_params
from igpt_jax import tfimport

HF_WEIGHTS = "model.safetensors"
HF_TORCH_WEIGHTS = "pytorch_model.bin"


# -- transformers -> igpt_jax ----------------------------------------------------------------

def _read_hf_state_dict(path: str) -> dict[str, np.ndarray]:
  safetensors_file = os.path.join(path, HF_WEIGHTS)
  if os.path.exists(safetensors_file):
    from safetensors.numpy import load_file
    return load_file(safetensors_file)
  torch_file = os.path.join(path, HF_TORCH_WEIGHTS)
  if os.path.exists(torch_file):
    try:
      import torch
    except ImportError as e:
      raise ImportError(f"{torch_file} is a PyTorch file; install torch to read it, or re-save "
                        "the model with safetensors.") from e
    state = torch.load(torch_file, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in state.items()}
  raise FileNotFoundError(f"No {HF_WEIGHTS} or {HF_TORCH_WEIGHTS} in {path}: is it a directory "
                          "written by transformers' save_pretrained?")


def config_from_hf(hf_config: dict, **overrides) -> model_lib.ModelConfig:
  """Our ModelConfig for a transformers ImageGPTConfig (as a dict from config.json)."""
  if hf_config.get("model_type") not in (None, "imagegpt"):
    raise ValueError(f"Not an ImageGPT config: model_type={hf_config.get('model_type')!r}.")
  if hf_config.get("activation_function", "quick_gelu") != "quick_gelu":
    raise ValueError("Only activation_function='quick_gelu' (the release's) is supported, got "
                     f"{hf_config['activation_function']!r}.")
  for flag, wanted in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                       ("add_cross_attention", False)):
    if hf_config.get(flag, wanted) != wanted:
      raise ValueError(f"{flag}={hf_config[flag]} is not part of iGPT and is not supported.")
  d = hf_config["n_embd"]
  n_inner = hf_config.get("n_inner") or 4 * d
  return model_lib.ModelConfig(
      num_layers=hf_config["n_layer"], d_model=d, num_heads=hf_config["n_head"],
      mlp_ratio=n_inner / d, vocab_size=hf_config["vocab_size"] - 1,
      seq_len=hf_config["n_positions"], objective="ar", use_bias=True,
      norm_eps=hf_config.get("layer_norm_epsilon", 1e-5), **overrides)


def params_from_hf(cfg: model_lib.ModelConfig, sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Maps a transformers state dict (with or without the `transformer.` prefix) to our names."""
  p = "transformer." if any(k.startswith("transformer.") for k in sd) else ""
  d, h, k, v = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.vocab_size

  def get(name):
    if name not in sd:
      raise KeyError(f"{name} is missing from the transformers weights.")
    return np.asarray(sd[name], np.float32)

  def stack(fmt, fn=lambda x: x):
    return np.stack([fn(get(p + fmt.format(i))) for i in range(cfg.num_layers)])

  def qkv(part, weight):  # part 0, 1, 2 = q, k, v of the fused c_attn
    def pick(x):
      x = np.split(x, 3, axis=-1)[part]
      return x.reshape(d, h, k) if weight else x.reshape(h, k)
    return pick

  wte = get(p + "wte.weight")
  if wte.shape[0] != v + 1:
    raise ValueError(f"wte has {wte.shape[0]} rows; expected {v} colours + 1 start token.")
  out = {
      "wte": wte[:v], "sos": wte[v], "wpe": get(p + "wpe.weight"),
      "ln_f": get(p + "ln_f.weight"),
      "blocks/ln_1": stack("h.{}.ln_1.weight"), "blocks/ln_2": stack("h.{}.ln_2.weight"),
      "blocks/attn_out": stack("h.{}.attn.c_proj.weight", lambda x: x.reshape(h, k, d)),
      "blocks/fc": stack("h.{}.mlp.c_fc.weight"), "blocks/fc_out": stack("h.{}.mlp.c_proj.weight"),
  }
  for i, name in enumerate("qkv"):
    out[f"blocks/{name}"] = stack("h.{}.attn.c_attn.weight", qkv(i, weight=True))
  if cfg.use_bias:
    for i, name in enumerate("qkv"):
      out[f"blocks/{name}_bias"] = stack("h.{}.attn.c_attn.bias", qkv(i, weight=False))
    out["blocks/attn_out_bias"] = stack("h.{}.attn.c_proj.bias")
    out["blocks/fc_bias"] = stack("h.{}.mlp.c_fc.bias")
    out["blocks/fc_out_bias"] = stack("h.{}.mlp.c_proj.bias")
  if "lm_head.weight" not in sd:
    raise KeyError("lm_head.weight is missing: save an ImageGPTForCausalImageModeling, not the "
                   "bare ImageGPTModel.")
  out["head"] = get("lm_head.weight")
  return out


def from_pretrained(path: str, **overrides):
  """Reads a transformers ImageGPTForCausalImageModeling directory; returns (ModelConfig, model).

  `overrides` set numerics of our ModelConfig (dtype, attention, remat, num_classes).
  """
  with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
    cfg = config_from_hf(json.load(f), **overrides)
  arrays = params_from_hf(cfg, _read_hf_state_dict(path))
  if cfg.num_classes:
    arrays["class_head"] = np.zeros((cfg.num_classes, cfg.d_model), np.float32)
    arrays["class_bias"] = np.zeros((cfg.num_classes,), np.float32)
    arrays["class_shift"] = np.zeros((cfg.d_model,), np.float32)
    arrays["class_scale"] = np.ones((cfg.d_model,), np.float32)
  return cfg, named_params.to_model(cfg, arrays)


# -- igpt_jax -> transformers ----------------------------------------------------------------

def hf_config_dict(cfg: model_lib.ModelConfig) -> dict:
  return {
      "architectures": ["ImageGPTForCausalImageModeling"],
      "model_type": "imagegpt",
      "vocab_size": cfg.vocab_size + 1,
      "n_positions": cfg.seq_len,
      "n_embd": cfg.d_model,
      "n_layer": cfg.num_layers,
      "n_head": cfg.num_heads,
      "n_inner": cfg.mlp_dim,
      "activation_function": "quick_gelu",
      "layer_norm_epsilon": cfg.norm_eps,
      "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
      "initializer_range": 0.02,
      "scale_attn_weights": True,
      "scale_attn_by_inverse_layer_idx": False,
      "reorder_and_upcast_attn": False,
      "tie_word_embeddings": False,
      "use_cache": True,
  }


def params_to_hf(cfg: model_lib.ModelConfig, params: dict) -> dict[str, np.ndarray]:
  """Our named params -> a transformers state dict; absent biases are written as zeros."""
  d, f = cfg.d_model, cfg.mlp_dim
  a = {name: np.asarray(x, np.float32) for name, x in params.items()}
  zeros = lambda *shape: np.zeros((cfg.num_layers,) + shape, np.float32)
  bias = lambda name, *shape: a.get(f"blocks/{name}", zeros(*shape))
  sd = {
      "transformer.wte.weight": np.concatenate([a["wte"], a["sos"][None]], axis=0),
      "transformer.wpe.weight": a["wpe"],
      "transformer.ln_f.weight": a["ln_f"],
      "lm_head.weight": a["head"],
  }
  for i in range(cfg.num_layers):
    pre = f"transformer.h.{i}."
    sd[pre + "ln_1.weight"] = a["blocks/ln_1"][i]
    sd[pre + "ln_2.weight"] = a["blocks/ln_2"][i]
    sd[pre + "attn.c_attn.weight"] = np.concatenate(
        [a[f"blocks/{n}"][i].reshape(d, d) for n in "qkv"], axis=1)
    sd[pre + "attn.c_attn.bias"] = np.concatenate(
        [bias(f"{n}_bias", cfg.num_heads, cfg.head_dim)[i].reshape(d) for n in "qkv"])
    sd[pre + "attn.c_proj.weight"] = a["blocks/attn_out"][i].reshape(d, d)
    sd[pre + "attn.c_proj.bias"] = bias("attn_out_bias", d)[i]
    sd[pre + "mlp.c_fc.weight"] = a["blocks/fc"][i]
    sd[pre + "mlp.c_fc.bias"] = bias("fc_bias", f)[i]
    sd[pre + "mlp.c_proj.weight"] = a["blocks/fc_out"][i]
    sd[pre + "mlp.c_proj.bias"] = bias("fc_out_bias", d)[i]
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def save_pretrained(model, cfg: model_lib.ModelConfig, path: str) -> None:
  """Writes config.json + model.safetensors that transformers' ImageGPTForCausalImageModeling loads."""
  if not cfg.causal:
    raise ValueError("transformers' ImageGPT is autoregressive only; a BERT-objective model has "
                     "no equivalent there.")
  from safetensors.numpy import save_file
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf_config_dict(cfg), f, indent=2)
  sd = params_to_hf(cfg, named_params.from_model(model))
  save_file(sd, os.path.join(path, HF_WEIGHTS), metadata={"format": "pt"})


# -- OpenAI's TensorFlow checkpoints -> igpt_jax -----------------------------------------------

def params_from_openai(read, n_layer: int, bert: bool) -> dict[str, np.ndarray]:
  """Maps the release's variables (read(name) -> array, names as in its src/model.py)."""
  def get(name):
    return np.asarray(read(f"model/{name}"), np.float32)

  def stack(fmt, fn=lambda x: x):
    return np.stack([fn(get(fmt.format(i))) for i in range(n_layer)])

  to_ours = lambda w: np.transpose(w, (2, 0, 1))  # [heads, head_dim, d] -> [d, heads, head_dim]
  out = {
      "wte": get("wte"), "wpe": get("wpe"), "head": get("wtet"), "ln_f": get("ln_f/g"),
      "blocks/ln_1": stack("h{}/ln_1/g"), "blocks/ln_2": stack("h{}/ln_2/g"),
      "blocks/q": stack("h{}/attn/q_proj", to_ours), "blocks/k": stack("h{}/attn/k_proj", to_ours),
      "blocks/v": stack("h{}/attn/v_proj", to_ours), "blocks/attn_out": stack("h{}/attn/c_proj"),
      "blocks/fc": stack("h{}/mlp/c_fc/w"), "blocks/fc_out": stack("h{}/mlp/c_proj/w"),
  }
  if not bert:
    out["sos"] = get("sos")
  return out


def from_openai_checkpoint(path: str, n_layer: int, n_embd: int, n_head: int,
                           bert: bool | None = None, **overrides):
  """Reads one of OpenAI's released iGPT checkpoints (TF1, possibly sharded); returns (cfg, model).

  `path` is the checkpoint prefix (e.g. .../model.ckpt-1000000) or its directory. `bert=None`
  detects the variant: BERT checkpoints have no `sos` vector. Needs TensorFlow.
  """
  tf = tfimport.tensorflow()
  prefix = tf.train.latest_checkpoint(path) if os.path.isdir(path) else path
  if prefix is None:
    raise FileNotFoundError(f"No TensorFlow checkpoint found in {path}.")
  reader = tf.train.load_checkpoint(prefix)
  shapes = reader.get_variable_to_shape_map()
  if "model/wte" not in shapes:
    raise ValueError(f"{prefix} has no model/wte: not an image-gpt checkpoint.")
  if bert is None:
    bert = "model/sos" not in shapes
  vocab, d = shapes["model/wte"]
  if d != n_embd:
    raise ValueError(f"Checkpoint width is {d}, but n_embd={n_embd} was given.")
  cfg = model_lib.ModelConfig(
      num_layers=n_layer, d_model=n_embd, num_heads=n_head, vocab_size=vocab,
      seq_len=shapes["model/wpe"][0], objective="bert" if bert else "ar",
      mlp_ratio=shapes["model/h0/mlp/c_fc/w"][1] / n_embd, **overrides)
  arrays = params_from_openai(reader.get_tensor, n_layer, bert)
  if cfg.num_classes:
    arrays["class_head"] = np.zeros((cfg.num_classes, cfg.d_model), np.float32)
    arrays["class_bias"] = np.zeros((cfg.num_classes,), np.float32)
    arrays["class_shift"] = np.zeros((cfg.d_model,), np.float32)
    arrays["class_scale"] = np.ones((cfg.d_model,), np.float32)
  return cfg, named_params.to_model(cfg, arrays)


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m igpt_jax.hf", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  conv = sub.add_parser("openai-to-hf", help="convert an OpenAI iGPT checkpoint to a "
                        "transformers directory")
  conv.add_argument("checkpoint")
  conv.add_argument("out_dir")
  for flag in ("--n_layer", "--n_embd", "--n_head"):
    conv.add_argument(flag, type=int, required=True)
  args = parser.parse_args(argv)
  cfg, model = from_openai_checkpoint(args.checkpoint, args.n_layer, args.n_embd, args.n_head)
  save_pretrained(model, cfg, args.out_dir)
  print(f"wrote {args.out_dir} ({model_lib.count_params(cfg):,} parameters)")


if __name__ == "__main__":
  main()
