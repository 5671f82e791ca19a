"""The paper's evaluation protocols as shipped configs: each loads for the released sizes, names
the paper's figure, and runs end to end from a released (OpenAI-layout) checkpoint on TFDS."""
import json
import os

import numpy as np
import pytest

from igpt_jax import main as main_lib
from igpt_jax import paper, probe, stages
from igpt_jax.config import UserError, load_config_file, validate
from test_hf import N_EMBD, N_HEAD, N_LAYER, N_VOCAB, openai_variables, write_tf1_checkpoint

CONFIGS = os.path.join(os.path.dirname(main_lib.__file__), "configs", "eval")
QUIET = lambda *_: None


@pytest.mark.parametrize("dataset", paper.DATASETS)
def test_eval_configs_build_the_released_shapes_and_name_the_papers_figures(dataset):
  path = os.path.join(CONFIGS, f"{dataset}.py")
  doc = open(path).read()
  for size, (layers, width, heads) in paper.RELEASED.items():
    config = load_config_file(f"{path}:{size}")
    validate(config)
    assert (config.model.num_layers, config.model.d_model, config.model.num_heads) == (
        layers, width, heads)
    assert (config.data.source, config.data.name, config.data.resolution) == ("tfds", dataset, 32)
    assert config.palette.k == 512 and config.stage == "probe"
  for protocol in ("probe", "finetune"):
    assert f"{paper.figure(dataset, protocol, 'l')}%" in doc  # the docstring states the table's
  assert paper.figure(dataset, "probe", "s") is None
  with pytest.raises(UserError, match="the model size is one of s, m, l"):
    load_config_file(f"{path}:xl")


def test_cifar10_protocol_from_an_openai_checkpoint_on_tfds(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  (tmp_path / "l").mkdir()
  prefix = write_tf1_checkpoint(openai_variables(bert=False, seed=5),
                                str(tmp_path / "l" / "model.ckpt-1000"))
  np.save(tmp_path / "l" / "kmeans_centers.npy",
          np.random.default_rng(0).uniform(-1, 1, (N_VOCAB, 3)).astype(np.float32))
  config = load_config_file(os.path.join(CONFIGS, "cifar10.py:l"))
  # The tiny released model stands in for iGPT-L: its shape and resolution, CPU settings.
  config.model.num_layers, config.model.d_model, config.model.num_heads = N_LAYER, N_EMBD, N_HEAD
  config.data.resolution, config.palette.k, config.init_from = 4, N_VOCAB, prefix
  config.model.dtype, config.mesh.data, config.mesh.fsdp = "float32", -1, 1
  config.train.accum_steps, config.probe.batch_size, config.probe.steps = 1, 32, 20
  config.probe.labels_per_class, config.probe.low_data_seeds = "1,2", 2
  workdir = str(tmp_path / "run")
  # The stage's own order (main.run), less the prepare-on-first-use of a TFDS source, which
  # mock data cannot feed (it has no split sizes): the probe reads TFDS directly.
  with tfds.testing.mock_data(num_examples=200):
    out = probe.run(stages.from_released(config, workdir, log=QUIET), workdir, log=QUIET)
  results = json.load(open(out["results"]))
  assert results["layers"] == list(range(1, N_LAYER + 1))
  assert results["train_examples"] == 180 and results["test_examples"] == 200  # 10% held out
  assert [x["labels_per_class"] for x in results["low_data"]] == [1, 2]
  assert all(len(r["accuracies"]) == 2 for x in results["low_data"] for r in x["by_layer"])
