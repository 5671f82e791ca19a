"""Stage evaluate: bits/dim of the pretrained model on the whole validation and test splits,
reported separately (validation is what model choices may look at; test is the final number);
and, where the workdir has a fine-tuned classifier, its test accuracy and its prediction for
every test image (classifier_test_predictions.npz: what an export must reproduce)."""

import io

import numpy as np

from igpt_jax import checkpoint as checkpoint_lib
from igpt_jax import distributed
from igpt_jax import evaluation
from igpt_jax import model as model_lib
from igpt_jax import sharding as sharding_lib
from igpt_jax import train as train_lib
from igpt_jax import workdir as workdir_lib
from igpt_jax.data import sources, transform
from igpt_jax.stages import prepare


def run(config, workdir, log=print) -> dict:
  config = prepare.resolved(config, workdir, log=log)
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.rules_from_config(config)
  cfg, params, centers, step = workdir_lib.load_pretrained(config, workdir, mesh, rules, log=log)
  trainer = train_lib.Trainer(cfg, config, mesh, rules)
  tokenizer = transform.Tokenizer(centers, config.data.resolution, mesh, rules)
  result = {"stage": "evaluate", "checkpoint_step": step}
  roles = ("validation", "test") if sources.validation_fraction(config) > 0 else ("test",)
  for role in roles:
    data = sources.load(config, role, log=log)
    result[f"{role}_examples"] = len(data)
    result.update(evaluation.evaluate(trainer, params, data, tokenizer, config, prefix=role))
  result.update(classifier(config, workdir, mesh, rules, log))
  path = workdir_lib.path(workdir) / "evaluate.json"
  workdir_lib.write_json(path, result)
  log("; ".join(f"{role} bits/dim {result[f'{role}_bits_per_dim']:.4f} "
                f"({result[f'{role}_loss']:.4f} nats/token)" for role in roles)
      + (f"; classifier test accuracy {result['classifier_test_accuracy']:.4f}"
         if "classifier_test_accuracy" in result else "") + f"; written to {path}")
  return result


def classifier(config, workdir, mesh, rules, log) -> dict:
  """The newest fine-tuning checkpoint's test accuracy and per-image predictions ({} without
  one). The model's shape, head and palette are the checkpoint's own."""
  ckpt = checkpoint_lib.Checkpointer(workdir_lib.checkpoint_dir(workdir, "finetune"))
  try:
    if not ckpt.all_steps():
      return {}
    cfg = model_lib.ModelConfig(**ckpt.read_meta(ckpt.all_steps()[-1])["model"])
    restored = ckpt.restore_latest({"params": train_lib.abstract_params(cfg, mesh, rules)},
                                   log=log)
  finally:
    ckpt.close()
  if restored is None:
    return {}
  step, state, meta = restored
  trainer = train_lib.Trainer(cfg, config, mesh, rules, stage="finetune")
  tokenizer = transform.Tokenizer(np.asarray(meta["palette"], np.float32),
                                  config.data.resolution, mesh, rules)
  data = sources.load(config, "test", log=log)
  predicted = evaluation.per_example(trainer, trainer.predict_fn, state["params"], data,
                                     tokenizer, config)
  out = workdir_lib.path(workdir) / "classifier_test_predictions.npz"
  if distributed.is_chief():
    buffer = io.BytesIO()
    np.savez(buffer, predictions=predicted, labels=data.labels)
    workdir_lib.write_bytes(out, buffer.getvalue())
  return {"classifier_checkpoint_step": step,
          "classifier_test_accuracy": float(np.mean(predicted == data.labels)),
          "classifier_predictions": str(out)}
