"""Released weights as a run's starting point: `--config.init_from=PATH`.

PATH is one of OpenAI's TF1 checkpoints (a `model.ckpt-N` prefix, or the folder holding one;
the palette is `kmeans_centers.npy` beside it, or `--config.palette.path`), or a Hugging Face
ImageGPT folder (config.json, model.safetensors or pytorch_model.bin, and the palette in
preprocessor_config.json's `clusters`). A workdir without a pretraining checkpoint starts from
these weights in every stage that reads one (evaluate, probe, finetune, sample) and in pretrain
(continued training from step 0 of a new schedule); once the workdir has its own checkpoint,
that one is used, so a preempted run resumes from where it was.

The model's shape and palette come from the weights; the config must agree (one `error:` line
naming each field and the value to set otherwise). `model.use_bias` is a property of the format
(transformers' layers have biases, OpenAI's do not), so it is taken from the weights.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from etils import epath

from igpt_jax import model as model_lib
from igpt_jax.config import UserError

OPENAI_PALETTE = "kmeans_centers.npy"
HF_PALETTE = "preprocessor_config.json"


@dataclasses.dataclass
class Released:
  path: str
  kind: str  # 'openai' | 'huggingface'
  cfg: model_lib.ModelConfig  # the shape; num_classes 0
  palette_path: epath.Path

  def arrays(self) -> dict[str, np.ndarray]:
    """The weights by our parameter names (named_params.from_model), float32 numpy."""
    from igpt_jax import hf
    if self.kind == "huggingface":
      return hf.params_from_hf(self.cfg, hf._read_hf_state_dict(self.path))
    reader = _openai_reader(self.path)[1]
    return hf.params_from_openai(reader.get_tensor, self.cfg.num_layers, not self.cfg.causal)


def _openai_reader(path: str):
  from igpt_jax import tfimport
  tf = tfimport.tensorflow()
  prefix = tf.train.latest_checkpoint(path) if os.path.isdir(path) else path
  if prefix is None:
    raise UserError(f"--config.init_from={path}: no TensorFlow checkpoint in that folder.")
  return prefix, tf.train.load_checkpoint(prefix)


def open_released(config) -> Released:
  """Reads the shape and finds the palette of config.init_from (no weights are read yet)."""
  from igpt_jax import hf
  path = config.init_from
  if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
    try:
      cfg = hf.config_from_hf(json.loads(open(os.path.join(path, "config.json")).read()))
    except (ValueError, KeyError) as e:
      raise UserError(f"--config.init_from={path}: its config.json is not a usable ImageGPT "
                      f"config ({e}).") from e
    palette = epath.Path(config.palette.path or os.path.join(path, HF_PALETTE))
    kind = "huggingface"
  elif os.path.exists(path + ".index") or (os.path.isdir(path) and os.path.exists(
      os.path.join(path, "checkpoint"))):
    prefix, reader = _openai_reader(path)
    shapes = reader.get_variable_to_shape_map()
    if "model/wte" not in shapes:
      raise UserError(f"--config.init_from={path}: {prefix} has no model/wte, so it is not an "
                      "image-gpt checkpoint.")
    vocab, d = shapes["model/wte"]
    layers = len({name.split("/")[1] for name in shapes if name.startswith("model/h")})
    # The release does not store the head count: it is the config's (S and M: 8, L: 16).
    cfg = model_lib.ModelConfig(
        num_layers=layers, d_model=d, num_heads=config.model.num_heads, vocab_size=vocab,
        seq_len=shapes["model/wpe"][0], mlp_ratio=shapes["model/h0/mlp/c_fc/w"][1] / d,
        objective="ar" if "model/sos" in shapes else "bert")
    palette = epath.Path(config.palette.path or os.path.join(
        os.path.dirname(os.path.abspath(prefix)), OPENAI_PALETTE))
    kind = "openai"
  else:
    raise UserError(f"--config.init_from={path} is neither a Hugging Face ImageGPT folder (with "
                    "config.json) nor an OpenAI checkpoint prefix (model.ckpt-N, with "
                    "model.ckpt-N.index beside it).")
  if not palette.exists():
    raise UserError(f"--config.init_from={path}: no palette at {palette}; set "
                    "--config.palette.path to the weights' palette (kmeans_centers.npy or "
                    "preprocessor_config.json).")
  return Released(path, kind, cfg, palette)


def resolved(config, released: Released, log=print):
  """config, checked against `released` (open_released(config)); model.use_bias set from it."""
  from igpt_jax import palette as palette_lib
  w = released.cfg
  k = palette_lib.Palette.load(released.palette_path).k
  if k != w.vocab_size:
    raise UserError(f"The palette at {released.palette_path} has {k} colours but the weights "
                    f"of {released.path} read {w.vocab_size} tokens: set --config.palette.path "
                    "to their palette.")
  wanted = {"model.num_layers": w.num_layers, "model.d_model": w.d_model,
            "model.num_heads": w.num_heads, "model.mlp_ratio": w.mlp_ratio,
            "model.objective": w.objective, "palette.k": w.vocab_size,
            "data.resolution": int(round(w.seq_len ** 0.5))}
  have = {key: config[key.split(".")[0]][key.split(".")[1]] for key in wanted}
  diff = [f"--config.{key}={wanted[key]!r} (configured {have[key]!r})"
          for key in wanted if have[key] != wanted[key]]
  if diff:
    raise UserError(f"The weights of --config.init_from={released.path} need "
                    + ", ".join(diff) + ".")
  if config.model.use_bias != w.use_bias:
    config = config.copy_and_resolve_references()
    config.model.use_bias = w.use_bias
    log(f"model.use_bias={w.use_bias}: the {released.kind} weights' layers "
        f"{'have' if w.use_bias else 'have no'} biases.")
  return config


def params(config, cfg: model_lib.ModelConfig, mesh, rules, log=print) -> dict:
  """The released weights as our parameter tree, each array placed straight into its sharding
  (nothing is whole on one device). `cfg` is the run's ModelConfig (resolved(config) agreed)."""
  import jax

  from igpt_jax import sharding as sharding_lib
  from igpt_jax import train as train_lib
  released = open_released(config)
  arrays = released.arrays()
  abstract = train_lib.abstract_params(cfg, mesh, rules)

  def place(path, spec):
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    if name not in arrays:
      raise UserError(f"{released.path} has no weights for parameter {name}.")
    value = np.ascontiguousarray(arrays[name], np.float32)
    if value.shape != spec.shape:
      raise UserError(f"{released.path}: parameter {name} has shape {value.shape}; the model "
                      f"expects {spec.shape}.")
    return sharding_lib.place(value, spec.sharding)

  out = jax.tree_util.tree_map_with_path(place, abstract)
  log(f"Loaded the released {released.kind} weights of {released.path} "
      f"({model_lib.count_params(cfg):,} parameters).")
  return out

