"""Stage evaluate: bits/dim of the pretrained model on the whole validation and test splits,
reported separately (validation is what model choices may look at; test is the final number)."""

from igpt_jax import evaluation
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
  path = workdir_lib.path(workdir) / "evaluate.json"
  workdir_lib.write_json(path, result)
  log("; ".join(f"{role} bits/dim {result[f'{role}_bits_per_dim']:.4f} "
                f"({result[f'{role}_loss']:.4f} nats/token)" for role in roles)
      + f"; written to {path}")
  return result
