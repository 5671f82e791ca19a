"""Stage export: the workdir's newest checkpoint as a Hugging Face ImageGPT folder.

Writes to --config.export.path (default <workdir>/hf): config.json and model.safetensors, which
transformers' ImageGPTForCausalImageModeling loads -- and ImageGPTForImageClassification too
when the workdir has a finetune checkpoint (its class head is `score`) --, the palette as
ImageGPTImageProcessor's preprocessor_config.json, and README.md, a model card written from the
workdir's own results (data, steps, bits/dim, probe and fine-tune accuracy, commands).

transformers' classifier has no bias: the fine-tuned head's bias is written as `score.bias`,
which it does not read (its logits are ours minus that bias); the model card says so.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from igpt_jax import checkpoint as checkpoint_lib
from igpt_jax import distributed
from igpt_jax import hf
from igpt_jax import metrics as metrics_lib
from igpt_jax import model as model_lib
from igpt_jax import sharding as sharding_lib
from igpt_jax import train as train_lib
from igpt_jax import workdir as workdir_lib
from igpt_jax.config import UserError
from igpt_jax.data import sources


def _newest(workdir) -> tuple[str, checkpoint_lib.Checkpointer]:
  for stage in ("finetune", "pretrain"):
    ckpt = checkpoint_lib.Checkpointer(workdir_lib.checkpoint_dir(workdir, stage))
    if ckpt.all_steps():
      return stage, ckpt
    ckpt.close()
  raise UserError(f"No checkpoint in {workdir_lib.checkpoint_dir(workdir, 'pretrain')} or "
                  "checkpoints/finetune: run pretrain (or finetune) in this --workdir first.")


def _flat(tree, prefix="") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}/"))
    else:
      out[prefix + key] = distributed.to_host(value)
  return out


def processor_config(centers: np.ndarray, resolution: int) -> dict:
  """ImageGPTImageProcessor's settings; a gray palette becomes gray RGB centres (an RGB image of
  a gray picture then quantizes to the same token)."""
  if centers.shape[1] == 1:
    centers = np.repeat(centers, 3, axis=1)
  return {"image_processor_type": "ImageGPTImageProcessor", "clusters": centers.tolist(),
          "do_resize": True, "size": {"height": resolution, "width": resolution},
          "resample": 2, "do_normalize": True, "do_color_quantize": True}


def _read_json(path):
  return json.loads(path.read_text()) if path.exists() else None


def model_card(workdir, stage: str, step: int, cfg, config, classes: int) -> str:
  root = workdir_lib.path(workdir)
  pre = _read_json(root / "config.pretrain.json") or _read_json(root / "config.json") or {}
  ev = _read_json(root / "evaluate.json")
  pr = _read_json(root / "probe" / "results.json")
  ft = next((r for r in reversed(metrics_lib.read_rows(root / "finetune"))
             if "test_accuracy" in r), None)
  data = pre.get("data", {})
  best_layer = f" (layer {pr['best_layer']})" if pr else ""
  fmt = lambda v, f="{:.4f}": "not measured" if v is None else f.format(v)  # noqa: E731
  lines = [
      "---", "library_name: transformers", "tags: [image-gpt, igpt_jax]", "---", "",
      f"# iGPT ({cfg.num_layers} layers, d_model {cfg.d_model}, {cfg.vocab_size} colours, "
      f"{int(round(cfg.seq_len ** 0.5))}x{int(round(cfg.seq_len ** 0.5))})", "",
      f"Exported by igpt_jax from the {stage} checkpoint at step {step} of `{workdir}`.", "",
      "| | |", "|---|---|",
      f"| objective | {cfg.objective} |",
      f"| parameters | {model_lib.count_params(cfg):,} |",
      f"| data | {sources.describe(data)} |",
      f"| pretraining steps x batch | {pre.get('train', {}).get('steps', '?')} x "
      f"{pre.get('train', {}).get('batch_size', '?')} |",
      f"| test bits/dim | {fmt(ev and ev.get('test_bits_per_dim'))} |",
      f"| linear probe, best layer (test accuracy) | {fmt(pr and pr.get('best_accuracy'))}"
      f"{best_layer} |",
      f"| fine-tuned (test accuracy) | {fmt(ft and ft.get('test_accuracy'))} |",
      "",
      "Load it:", "", "```python",
      "from transformers import ImageGPTForCausalImageModeling, ImageGPTImageProcessor",
      "model = ImageGPTForCausalImageModeling.from_pretrained(PATH)",
      "processor = ImageGPTImageProcessor.from_pretrained(PATH)  # the palette", "```", ""]
  if classes:
    lines += [f"The fine-tuned classifier ({classes} classes) loads as "
              "`ImageGPTForImageClassification`. As in OpenAI's release, its head pools the "
              "final norm over the shifted inputs: pass `input_ids` = [sos] + tokens[:-1] "
              f"(sos = {cfg.vocab_size}). transformers' class head has no bias: add `score.bias` "
              "from model.safetensors to its logits to get this model's.", ""]
  lines += ["Exported with:", "", "```bash",
            " ".join(["python -m igpt_jax.main", *sys.argv[1:]]) if sys.argv[1:] else
            f"python -m igpt_jax.main --config.stage=export --workdir={workdir}", "```", ""]
  return "\n".join(lines)


def run(config, workdir, log=print) -> dict:
  stage, ckpt = _newest(workdir)
  try:
    step = ckpt.all_steps()[-1]
    cfg = model_lib.ModelConfig(**ckpt.read_meta(step)["model"])  # the saved shape
    if not cfg.causal:
      raise UserError("transformers' ImageGPT is autoregressive only: a BERT-objective model "
                      "has no Hugging Face equivalent to export to.")
    mesh = sharding_lib.make_mesh(config.mesh)
    rules = sharding_lib.rules_from_config(config)
    restored = ckpt.restore_latest({"params": train_lib.abstract_params(cfg, mesh, rules)},
                                   log=log)
  finally:
    ckpt.close()
  if restored is None:
    raise UserError(f"No readable checkpoint in {ckpt.directory}.")
  step, state, meta = restored
  arrays = _flat(state["params"])
  centers = np.asarray(meta["palette"], np.float32)
  out = workdir_lib.path(config.export.path or workdir_lib.path(workdir) / "hf")
  if distributed.is_chief():
    from safetensors.numpy import save
    out.mkdir(parents=True, exist_ok=True)
    hf_config = hf.hf_config_dict(cfg)
    sd = hf.params_to_hf(cfg, arrays)
    if cfg.num_classes:
      hf_config["architectures"] += ["ImageGPTForImageClassification"]
      hf_config["num_labels"] = cfg.num_classes
      names = meta.get("class_names") or [f"LABEL_{i}" for i in range(cfg.num_classes)]
      if len(names) == cfg.num_classes:  # the fine-tuning data's class names
        hf_config["id2label"] = dict(enumerate(names))
        hf_config["label2id"] = {name: i for i, name in enumerate(names)}
      # Our head reads (pooled - shift) * scale; transformers' reads pooled: fold them in.
      w, scale = np.asarray(arrays["class_head"], np.float64), arrays["class_scale"]
      sd["score.weight"] = np.ascontiguousarray(w * scale, np.float32)
      sd["score.bias"] = np.ascontiguousarray(
          arrays["class_bias"] - w @ (arrays["class_shift"] * scale), np.float32)
    workdir_lib.write_text(out / "config.json", json.dumps(hf_config, indent=2))
    workdir_lib.write_bytes(out / hf.HF_WEIGHTS, save(sd, metadata={"format": "pt"}))
    workdir_lib.write_text(out / "preprocessor_config.json", json.dumps(
        processor_config(centers, int(round(cfg.seq_len ** 0.5))), indent=2))
    workdir_lib.write_text(out / "README.md",
                           model_card(workdir, stage, step, cfg, config, cfg.num_classes))
    log(f"Exported the {stage} checkpoint at step {step} to {out} (transformers "
        f"ImageGPTForCausalImageModeling{', ImageGPTForImageClassification' if cfg.num_classes else ''}"
        ", ImageGPTImageProcessor).")
  distributed.barrier("export")
  return {"stage": "export", "path": str(out), "from": stage, "step": step,
          "classes": cfg.num_classes}
