"""`--config.init_from`: released weights (Hugging Face and OpenAI layouts) start every stage
that reads weights, with the same numbers as the reference implementations."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from igpt_jax import main as main_lib
from igpt_jax import objectives
from igpt_jax import palette as palette_lib
from igpt_jax.config import UserError
from igpt_jax.data import pipeline, sources
from test_hf import (N_CTX, N_EMBD, N_HEAD, N_LAYER, N_VOCAB, hf_logits, hf_model,
                     openai_variables, release_forward, write_tf1_checkpoint)
from test_train import tiny_config

transformers = pytest.importorskip("transformers")
QUIET = lambda *_: None
RES = 4  # N_CTX = 16 tokens = 4 x 4 pixels


def image_npz(path, n_train=96, n_test=48, seed=0):
  """Small RGB images at the model's resolution, 3 classes."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, n in (("train", n_train), ("test", n_test)):
    arrays[f"{split}_images"] = rng.integers(0, 256, (n, RES, RES, 3), dtype=np.uint8)
    arrays[f"{split}_labels"] = rng.integers(0, 3, n)
  np.savez(path, **arrays, class_names=np.array(["cat", "dog", "owl"]))
  return str(path)


def config_for(init_from, data_path, k, stage):
  config = tiny_config(steps=2, warmup_steps=1, lr=0.0)
  config.stage = stage
  config.init_from = init_from
  config.data.source, config.data.path = "numpy", data_path
  config.data.resolution, config.data.channels, config.data.augment = RES, 3, "none"
  config.palette.k = k
  config.model.num_layers, config.model.d_model, config.model.num_heads = N_LAYER, N_EMBD, N_HEAD
  config.train.batch_size = 8
  config.finetune.steps, config.finetune.eval_every, config.finetune.lr = 2, 2, 1e-3
  config.probe.steps, config.sample.num, config.sample.completions = 20, 2, 2
  return config


def expected_bits_per_dim(config, centers, logits_fn):
  """The reference model's bits/dim on the test split, tokenised as the stages tokenise it."""
  tokens = pipeline.tokens_of(sources.load(config, "test", log=QUIET), centers, RES)
  nll = objectives.token_nll(jnp.asarray(logits_fn(tokens)), jnp.asarray(tokens))
  return objectives.bits_per_dim(float(jnp.mean(nll)), 3)


def run(config, workdir):
  return main_lib.run(config, str(workdir))


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
  """A random transformers ImageGPT with a palette, and a workdir whose every stage started
  from it: (reference model, released folder, data, workdir, results by stage)."""
  tmp = tmp_path_factory.mktemp("released")
  shape = dict(n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD, n_positions=N_CTX, vocab_size=17)
  reference = hf_model(shape, seed=0)
  released = tmp / "imagegpt"
  reference.save_pretrained(released)
  clusters = np.random.default_rng(1).uniform(-1, 1, (16, 3)).round(4)
  (released / "preprocessor_config.json").write_text(json.dumps({"clusters": clusters.tolist()}))
  data = image_npz(tmp / "images.npz")
  workdir = tmp / "run"
  results = {stage: run(config_for(str(released), data, 16, stage), workdir)
             for stage in ("evaluate", "probe", "finetune", "sample")}
  return reference, released, data, workdir, results


def test_every_stage_starts_from_a_hugging_face_folder(hf_run):
  reference, released, data, workdir, results = hf_run
  centers = palette_lib.Palette.load(workdir / "palette.npz").centers
  clusters = json.loads((released / "preprocessor_config.json").read_text())["clusters"]
  np.testing.assert_allclose(centers, clusters, atol=1e-6)  # the weights' palette, installed
  want = expected_bits_per_dim(config_for(str(released), data, 16, "evaluate"), centers,
                               lambda t: hf_logits(reference, t))
  assert results["evaluate"]["checkpoint_step"] == 0
  assert results["evaluate"]["test_bits_per_dim"] == pytest.approx(want, rel=1e-5)
  assert results["finetune"]["step"] == 2 and results["probe"]["best_accuracy"] >= 0
  assert os.path.exists(results["sample"]["completions"])
  # Continued pretraining starts from the weights (lr 0 here: they must come back unchanged),
  # and from then on the workdir's own checkpoint is the one every stage reads.
  assert run(config_for(str(released), data, 16, "pretrain"), workdir)["step"] == 2
  again = run(config_for(str(released), data, 16, "evaluate"), workdir)
  assert again["checkpoint_step"] == 2
  assert again["test_bits_per_dim"] == pytest.approx(want, rel=1e-5)


def test_export_loads_in_transformers_with_the_same_logits(hf_run, tmp_path):
  """The fine-tuned workdir -> a folder that transformers' causal and classification models and
  its image processor load; logits equal ours on the same tokens."""
  import torch
  from flax import nnx

  from igpt_jax import checkpoint as checkpoint_lib
  from igpt_jax import model as model_lib
  from igpt_jax import sharding as sharding_lib
  from igpt_jax import train as train_lib
  from igpt_jax import workdir as workdir_lib
  _, released, data, workdir, _ = hf_run
  config = config_for("", data, 16, "export")
  config.export.path = str(tmp_path / "hf")
  out = run(config, workdir)
  assert out["from"] == "finetune" and out["classes"] == 3

  ckpt = checkpoint_lib.Checkpointer(workdir_lib.checkpoint_dir(workdir, "finetune"))
  cfg = model_lib.ModelConfig(**ckpt.read_meta(ckpt.all_steps()[-1])["model"])
  mesh = sharding_lib.make_mesh(config.mesh)
  _, state, _ = ckpt.restore_latest({"params": train_lib.abstract_params(
      cfg, mesh, sharding_lib.DEFAULT_RULES)})
  ckpt.close()
  ours = nnx.merge(nnx.graphdef(model_lib.abstract_model(cfg)),
                   jax_to_numpy(state["params"]))
  tokens = np.random.default_rng(7).integers(0, 16, (3, N_CTX))
  logits, class_logits = (np.asarray(x) for x in ours.logits_and_class_logits(tokens))

  causal = transformers.ImageGPTForCausalImageModeling.from_pretrained(out["path"]).eval()
  np.testing.assert_allclose(hf_logits(causal, tokens), logits, atol=1e-4)
  classifier = transformers.ImageGPTForImageClassification.from_pretrained(out["path"]).eval()
  assert classifier.config.id2label == {0: "cat", 1: "dog", 2: "owl"}  # not LABEL_0..2
  shifted = np.concatenate([np.full((3, 1), 16), tokens[:, :-1]], axis=1)  # [sos] + x[:-1]
  with torch.no_grad():  # the class head reads what the release's does: the shifted inputs
    hf_class = classifier(torch.as_tensor(shifted)).logits.numpy()
  from safetensors.numpy import load_file
  assert "score.bias" not in load_file(os.path.join(out["path"], "model.safetensors"))
  np.testing.assert_allclose(hf_class, class_logits, atol=1e-4)  # no bias: the same logits

  processor = transformers.ImageGPTImageProcessor.from_pretrained(out["path"])
  centers = palette_lib.Palette.load(workdir / "palette.npz").centers
  np.testing.assert_allclose(processor.clusters, centers, atol=1e-6)
  images = np.load(data)["test_images"][:4]  # at the model's resolution: no resizing
  hf_tokens = processor(images=list(images), return_tensors="np",
                        input_data_format="channels_last")["input_ids"]
  np.testing.assert_array_equal(hf_tokens, pipeline.tokens_of(
      sources.from_arrays(images, channels=3), centers, RES))
  card = open(os.path.join(out["path"], "README.md")).read()
  assert "step 2" in card and "ImageGPTForImageClassification" in card


def jax_to_numpy(tree):
  import jax
  return jax.tree.map(np.asarray, tree)


def test_an_openai_checkpoint_with_its_palette_beside_it(tmp_path):
  variables = openai_variables(bert=False, seed=4)
  (tmp_path / "s").mkdir()
  prefix = write_tf1_checkpoint(variables, str(tmp_path / "s" / "model.ckpt-1000"))
  np.save(tmp_path / "s" / "kmeans_centers.npy",
          np.random.default_rng(2).uniform(-1, 1, (N_VOCAB, 3)).astype(np.float32))
  data = image_npz(tmp_path / "images.npz")
  config = config_for(prefix, data, N_VOCAB, "evaluate")
  ev = run(config, tmp_path / "run")
  centers = palette_lib.Palette.load(tmp_path / "run" / "palette.npz").centers
  want = expected_bits_per_dim(config, centers,
                               lambda t: release_forward(variables, t, bert=False))
  assert ev["test_bits_per_dim"] == pytest.approx(want, rel=1e-5)


def test_a_config_that_disagrees_with_the_weights_is_one_sentence(tmp_path):
  variables = openai_variables(bert=False, seed=4)
  (tmp_path / "s").mkdir()
  prefix = write_tf1_checkpoint(variables, str(tmp_path / "s" / "model.ckpt-1000"))
  data = image_npz(tmp_path / "images.npz")
  config = config_for(prefix, data, N_VOCAB, "evaluate")
  with pytest.raises(UserError, match="no palette at .*kmeans_centers.npy"):
    run(config, tmp_path / "run")
  np.save(tmp_path / "s" / "kmeans_centers.npy", np.zeros((N_VOCAB, 3), np.float32) + 0.1)
  config.model.d_model, config.data.resolution = 64, 8
  with pytest.raises(UserError, match=r"need --config.model.d_model=32 \(configured 64\), "
                                      r"--config.data.resolution=4 \(configured 8\)"):
    run(config, tmp_path / "run")
  config = config_for(str(tmp_path / "nothing"), data, N_VOCAB, "probe")
  with pytest.raises(UserError, match="neither a Hugging Face ImageGPT folder"):
    run(config, tmp_path / "run")


def test_a_head_with_a_bias_is_exported_with_it_and_said():
  """finetune.head_bias=True: transformers' score has no bias, so the bias (with the LP-FT shift
  folded in) goes to score.bias for the user to add; without one, nothing is written."""
  from igpt_jax.stages import export
  rng = np.random.default_rng(0)
  arrays = {"class_head": rng.normal(size=(3, 8)), "class_shift": rng.normal(size=8),
            "class_scale": rng.uniform(0.5, 2, 8), "class_bias": rng.normal(size=3)}
  pooled = rng.normal(size=(5, 8))
  ours = ((pooled - arrays["class_shift"]) * arrays["class_scale"]) @ arrays["class_head"].T
  weight, bias = export.classifier_weights(arrays)
  np.testing.assert_allclose(pooled @ weight.T + bias, ours + arrays["class_bias"], rtol=1e-5)
  del arrays["class_bias"]
  arrays["class_shift"] = np.zeros(8)  # a bias-free head's probe does not centre
  weight, bias = export.classifier_weights(arrays)
  assert bias is None
  np.testing.assert_allclose(pooled @ weight.T, pooled * arrays["class_scale"] @ arrays[
      "class_head"].T, rtol=1e-5)


def test_push_to_hub_creates_the_repo_and_uploads_the_folder(tmp_path, monkeypatch):
  """export.push_to_hub: the calls huggingface_hub gets (a private repo created if missing, the
  whole folder in one commit), and the Hub's errors as one line."""
  huggingface_hub = pytest.importorskip("huggingface_hub")
  from igpt_jax.stages import export
  calls = []

  class Commit:
    commit_url = "https://huggingface.co/me/igpt/commit/abc"

  class FakeApi:
    def create_repo(self, *args, **kwargs):
      calls.append(("create_repo", args, kwargs))

    def upload_folder(self, **kwargs):
      calls.append(("upload_folder", (), kwargs))
      if kwargs["repo_id"] == "me/denied":
        raise RuntimeError("401 Client Error: Unauthorized for url\nmore detail")
      return Commit()

  monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
  logged = []
  url = export.push_to_hub(tmp_path, "me/igpt", False, "igpt_jax export", logged.append)
  assert url == Commit.commit_url and Commit.commit_url in logged[-1]
  assert calls == [
      ("create_repo", ("me/igpt",), {"repo_type": "model", "private": True, "exist_ok": True}),
      ("upload_folder", (), {"repo_id": "me/igpt", "repo_type": "model",
                             "folder_path": str(tmp_path), "commit_message": "igpt_jax export"})]
  with pytest.raises(UserError, match=r"^Uploading .* to the Hub repo me/denied failed: 401 "
                     r"Client Error: Unauthorized for url \(a token"):
    export.push_to_hub(tmp_path, "me/denied", True, "m", logged.append)
  with pytest.raises(UserError, match="give a Hub repo as 'user/name'"):
    export.push_to_hub(tmp_path, "igpt", True, "m", logged.append)
