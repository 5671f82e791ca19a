"""Stage export: the workdir's newest checkpoint as a Hugging Face ImageGPT folder.

Writes to --config.export.path (default <workdir>/hf): config.json and model.safetensors, which
transformers' ImageGPTForCausalImageModeling loads -- and ImageGPTForImageClassification too
when the workdir has a finetune checkpoint (its class head is `score`) --, the palette as
ImageGPTImageProcessor's preprocessor_config.json, and README.md, a model card written from the
workdir's own results (data, steps, bits/dim, probe and fine-tune accuracy, commands).

The classifier predicts what ours predicts when the head has no bias (finetune.head_bias=False,
the default, as OpenAI's release): transformers' `score` has none. A head with a bias is still
written (the bias as `score.bias`, which transformers does not read); export warns with the
bias's spread, and the model card tells the user to add it. The image processor is ours
(hf_processor.py, copied into the folder): the centre square, the evaluation crop and the area
resize the model saw, so raw photos tokenize as in igpt_jax. `export.push_to_hub=REPO` uploads
the folder with huggingface_hub.
"""

from __future__ import annotations

import importlib.resources
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


PROCESSOR_FILE = "image_processing_igpt_jax.py"


def processor_config(centers: np.ndarray, resolution: int, view: dict | None = None) -> dict:
  """The image processor's settings: ImageGPTImageProcessor's (a gray palette as gray RGB
  centres; BOX resampling, the closest PIL has to an area resize), which the stock class reads,
  plus our processor's view of an image (`view`: transform.input_view; None, for checkpoints
  saved before it was recorded: the whole image's centre square) and the auto_map that loads it
  with trust_remote_code=True."""
  channels = centers.shape[1]
  if channels == 1:
    centers = np.repeat(centers, 3, axis=1)
  view = view or {"short_side": None, "crop_box": [0.0, 0.0, 1.0, 1.0],
                  "resolution": resolution, "channels": channels}
  return {"image_processor_type": "ImageGPTImageProcessor", "clusters": centers.tolist(),
          "do_resize": True, "size": {"height": resolution, "width": resolution},
          "resample": 4, "do_normalize": True, "do_color_quantize": True, **view,
          "auto_map": {"AutoImageProcessor":
                       f"{PROCESSOR_FILE[:-3]}.IgptJaxImageProcessor"}}


def processor_source() -> str:
  """hf_processor.py's text (read, not imported: it needs transformers)."""
  return importlib.resources.files("igpt_jax").joinpath("hf_processor.py").read_text()


def push_to_hub(folder, repo: str, public: bool, message: str, log) -> str:
  """Uploads the exported folder to the Hub model repo `repo` (created when missing); -> the
  commit's URL. Errors a user can fix (no token, no access, a bad name) are one line."""
  try:
    import huggingface_hub
  except ImportError as e:
    raise UserError("--config.export.push_to_hub needs huggingface_hub: pip install "
                    "'igpt_jax[hub]' (or huggingface_hub).") from e
  if repo.count("/") != 1 or not all(repo.split("/")):
    raise UserError(f"--config.export.push_to_hub={repo!r}: give a Hub repo as 'user/name'.")
  api = huggingface_hub.HfApi()
  try:
    api.create_repo(repo, repo_type="model", private=not public, exist_ok=True)
    commit = api.upload_folder(repo_id=repo, repo_type="model", folder_path=str(folder),
                               commit_message=message)
  except Exception as e:  # noqa: BLE001 - the Hub's errors (auth, network, names) are the user's
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise UserError(f"Uploading {folder} to the Hub repo {repo} failed: {first} (a token: "
                    "HF_TOKEN or `hf auth login`).") from e
  url = getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo}"
  log(f"Uploaded {folder} to {url}.")
  return url


def classifier_weights(arrays: dict) -> tuple[np.ndarray, np.ndarray | None]:
  """transformers' `score.weight` [classes, d] and our head's bias in its coordinates (None
  when the head has none): our head reads (pooled - shift) * scale, theirs reads pooled."""
  w, scale = np.asarray(arrays["class_head"], np.float64), arrays["class_scale"]
  bias = arrays.get("class_bias", 0.0) - w @ (arrays["class_shift"] * scale)
  weight = np.ascontiguousarray(w * scale, np.float32)
  if "class_bias" not in arrays and not np.any(bias):
    return weight, None
  return weight, np.ascontiguousarray(bias, np.float32)


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
  lines += ["Images to tokens as this model saw them (centre square, evaluation crop, area "
            "resize, palette): `AutoImageProcessor.from_pretrained(PATH, trust_remote_code=True)` "
            f"(`{PROCESSOR_FILE}` in this folder). The stock `ImageGPTImageProcessor` squashes "
            "the whole image instead.", ""]
  if classes:
    lines += [f"The fine-tuned classifier ({classes} classes) loads as "
              "`ImageGPTForImageClassification`. As in OpenAI's release, its head pools the "
              "final norm over the shifted inputs: pass `input_ids` = [sos] + tokens[:-1] "
              f"(sos = {cfg.vocab_size}).", "", "```python",
              "ids = processor(images, return_tensors='pt')['input_ids']",
              f"shifted = torch.cat([torch.full_like(ids[:, :1], {cfg.vocab_size}), "
              "ids[:, :-1]], 1)",
              "predicted = classifier(shifted).logits.argmax(-1)", "```", ""]
    if cfg.class_bias:
      lines += ["This head was fine-tuned with a bias (finetune.head_bias=True), which "
                "transformers' class head does not have: add `score.bias` from "
                "model.safetensors to its logits to get this model's.", ""]
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
      sd["score.weight"], bias = classifier_weights(arrays)
      if bias is not None:
        sd["score.bias"] = bias
        log(f"warning: this class head has a bias (finetune.head_bias=True; spread "
            f"{np.ptp(bias):.3g}), which transformers' ImageGPTForImageClassification does not "
            "read: its predictions can differ from this model's. It is written as score.bias; "
            "fine-tune with finetune.head_bias=False for an exact export.")
    workdir_lib.write_text(out / "config.json", json.dumps(hf_config, indent=2))
    workdir_lib.write_bytes(out / hf.HF_WEIGHTS, save(sd, metadata={"format": "pt"}))
    workdir_lib.write_text(out / "preprocessor_config.json", json.dumps(
        processor_config(centers, int(round(cfg.seq_len ** 0.5)), meta.get("input_view")),
        indent=2))
    workdir_lib.write_text(out / PROCESSOR_FILE, processor_source())
    workdir_lib.write_text(out / "README.md",
                           model_card(workdir, stage, step, cfg, config, cfg.num_classes))
    log(f"Exported the {stage} checkpoint at step {step} to {out} (transformers "
        f"ImageGPTForCausalImageModeling{', ImageGPTForImageClassification' if cfg.num_classes else ''}"
        ", ImageGPTImageProcessor).")
  distributed.barrier("export")
  result = {"stage": "export", "path": str(out), "from": stage, "step": step,
            "classes": cfg.num_classes}
  if config.export.push_to_hub and distributed.is_chief():
    result["hub"] = push_to_hub(out, config.export.push_to_hub, config.export.public,
                                f"igpt_jax export of the {stage} checkpoint at step {step}", log)
  return result
