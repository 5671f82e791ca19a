"""A run's saved config (`<workdir>/config.json` or `config.<stage>.json`, which every stage
writes) as a config again: what `--config=<workdir>/config.json` loads, and `--workdir=W` alone
(the run's first config). Fields are set over the base config's, so each keeps its type."""

import json

from etils import epath

from igpt_jax import config as config_lib


def get_config(path: str):
  saved = json.loads(epath.Path(path).read_text())
  config = config_lib.base_config()
  _update(config, saved)
  return config


def _update(config, saved: dict) -> None:
  for key, value in saved.items():
    if isinstance(value, dict) and hasattr(config.get(key), "items"):
      _update(config[key], value)
    else:
      config[key] = value
