"""The downstream stages on a tiny pretrained Fashion-MNIST model, and their refusals."""
import json
import os
import shutil

import numpy as np
import pytest

from igpt_jax import main as main_lib
from igpt_jax import palette as palette_lib
from igpt_jax import checkpoint as checkpoint_lib
from igpt_jax import loop, probe, sample
from igpt_jax.stages import evaluate as evaluate_stage
from igpt_jax.stages import pretrain as pretrain_stage
from igpt_jax import workdir as workdir_lib
from igpt_jax.config import UserError
from igpt_jax.data import sources
from test_train import tiny_config

pytestmark = pytest.mark.skipif(sources.fashion_mnist_dir() is None,
                                reason="Debian's dataset-fashion-mnist is not installed")
QUIET = lambda *_: None


def stage_config(stage):
  config = tiny_config(steps=8, warmup_steps=2)
  config.stage = stage
  config.finetune.steps, config.finetune.eval_every, config.finetune.eval_batches = 4, 4, 2
  config.probe.train_examples, config.probe.test_examples, config.probe.steps = 300, 200, 50
  config.probe.validation_examples = 200
  config.sample.num, config.sample.completions = 3, 2
  return config


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("stages"))
  pretrain_stage.run(stage_config("pretrain"), workdir, log=QUIET)
  return workdir


def test_evaluate_probe_finetune_sample(pretrained, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(pretrained, workdir)
  ev = evaluate_stage.run(stage_config("evaluate"), workdir, log=QUIET)
  # Validation (6k held out of train) and test (10k) reported separately.
  assert ev["test_examples"] == 10_000 and ev["validation_examples"] == 6_000
  assert 0 < ev["test_bits_per_dim"] < 4 and 0 < ev["validation_bits_per_dim"] < 4
  assert not any(k.startswith("eval_") for k in ev)  # eval_* is validation everywhere else
  assert ev["test_loss"] != ev["validation_loss"]
  assert json.load(open(os.path.join(workdir, "evaluate.json")))["test_loss"] == ev["test_loss"]

  config = stage_config("probe")
  config.probe.labels_per_class, config.probe.low_data_seeds = "3,10", 2
  config.checkpoint.load_step = 8  # the only step kept: the same weights as the newest
  pr = probe.run(config, workdir, log=QUIET)
  results = json.load(open(pr["results"]))
  assert [r["layer"] for r in results["by_layer"]] == [1, 2]
  # Per-example test predictions, for paired comparisons: they give the reported accuracies.
  saved = np.load(os.path.join(workdir, "probe", "test_predictions.npz"))
  assert len(saved["labels"]) == 200
  for r in results["by_layer"]:
    assert np.mean(saved[f"layer{r['layer']}"] == saved["labels"]) == r["accuracy"]
    assert r["l2"] in r["l2_tried"]
  assert np.mean(saved["raw_pixels"] == saved["labels"]) == results["raw_pixel_accuracy"]
  # Low-data probes: each count, each layer, one test accuracy per draw.
  low = results["low_data"]
  assert [x["labels_per_class"] for x in low] == [3, 10]
  assert [x["train_examples"] for x in low] == [30, 100]
  for x in low:
    for r in x["by_layer"]:
      assert len(r["accuracies"]) == 2 and r["mean"] == pytest.approx(np.mean(r["accuracies"]))
      assert r["std"] == pytest.approx(np.std(r["accuracies"], ddof=1))
  # Draws differ (different examples), and more labels help the best layer on average.
  assert low[0]["by_layer"][0]["accuracies"][0] != low[0]["by_layer"][0]["accuracies"][1]
  assert low[1]["best_mean"] > low[0]["best_mean"]
  assert "10 labels per class" in open(os.path.join(workdir, "probe", "results.md")).read()
  config.probe.labels_per_class = "30000"
  with pytest.raises(UserError, match="30000 per class needs 30000 train examples"):
    probe.run(config, workdir, log=QUIET)
  config.checkpoint.load_step = 4
  with pytest.raises(UserError, match="load_step=4: .* holds steps 8; choose one of them"):
    probe.run(config, workdir, log=QUIET)
  # The best layer is chosen on validation and reported with its test accuracy.
  best = max(results["by_layer"], key=lambda r: r["val_accuracy"])
  assert (results["best_layer"], results["best_accuracy"]) == (best["layer"], best["accuracy"])
  assert results["random_init_accuracy"] == max(
      results["random_init_by_layer"], key=lambda r: r["val_accuracy"])["accuracy"]
  assert results["raw_pixel_accuracy"] > 0.5  # 10 classes: far above chance on real pixels
  assert os.path.getsize(os.path.join(workdir, "probe", "accuracy_by_layer.png")) > 1000

  ft = loop.finetune(stage_config("finetune"), workdir, log=QUIET)
  assert ft["step"] == 4 and np.isfinite(ft["clf_loss"])
  # Test accuracy over the whole 10k test split: a count of correct images out of 10,000.
  assert ft["test_accuracy"] * 10_000 == pytest.approx(round(ft["test_accuracy"] * 10_000), abs=1e-2)
  rows = [json.loads(l) for l in open(os.path.join(workdir, "finetune", "metrics.jsonl"))]
  assert rows[-1]["step"] == 4 and rows[-1]["eval_accuracy"] == ft["eval_accuracy"]
  assert os.listdir(os.path.join(workdir, "checkpoints", "finetune"))

  sm = sample.run(stage_config("sample"), workdir, log=QUIET)
  from PIL import Image
  grid = np.asarray(Image.open(sm["completions"]))
  assert grid.shape[0] > grid.shape[1] / 2  # three rows: originals, halves, completions


def test_stages_refuse_another_model_or_palette(pretrained, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(pretrained, workdir)
  wider = stage_config("probe")
  wider.model.d_model = 64
  for fn in (probe.run, sample.run, loop.finetune):
    with pytest.raises(checkpoint_lib.CheckpointMismatch,
                       match="different model: d_model saved 32 vs configured 64"):
      fn(wider, workdir, log=QUIET)
  path = os.path.join(workdir, palette_lib.PALETTE_FILE)
  pal = palette_lib.Palette.load(path)
  workdir_lib.save_palette(palette_lib.Palette(np.clip(pal.centers + 0.05, -1, 1)), path)
  for fn in (probe.run, sample.run, loop.finetune):
    with pytest.raises(checkpoint_lib.CheckpointMismatch, match="different palette"):
      fn(stage_config("probe"), workdir, log=QUIET)


def test_stage_without_pretraining_says_what_to_do(tmp_path):
  with pytest.raises(UserError, match="run the pretrain stage first"):
    workdir_lib.load_pretrained(stage_config("probe"), str(tmp_path))


def test_unknown_stage_is_refused():
  config = stage_config("pretrain")
  config.stage = "pretrian"
  with pytest.raises(UserError, match="Unknown stage 'pretrian'"):
    main_lib.run(config, "/tmp/igpt_unknown_stage")


def test_finetuning_starts_from_the_pretrained_weights_and_learns(pretrained, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(pretrained, workdir)
  config = stage_config("finetune")
  config.finetune.steps, config.finetune.warmup_steps, config.finetune.lr = 40, 2, 1e-2
  config.finetune.eval_every, config.finetune.eval_batches = 40, 2
  config.finetune.head_init = "zeros"  # as released: the head has to learn from nothing
  config.finetune.head_lr = -1.0  # at the trunk's 1e-2
  loop.finetune(config, workdir, log=QUIET)
  rows = [json.loads(l) for l in open(os.path.join(workdir, "finetune", "metrics.jsonl"))]
  assert [r["step"] for r in rows] == list(range(1, 41))
  # A zero output head would predict 16 colours uniformly: 4 bits/dim. The pretrained one does
  # better from the first step; the class head starts at zero: ln(10) exactly.
  pretrain_rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert rows[0]["bits_per_dim"] < 3.9 and pretrain_rows[-1]["bits_per_dim"] < 3.9
  assert rows[0]["clf_loss"] == pytest.approx(np.log(10), abs=1e-5)
  late = np.mean([r["clf_loss"] for r in rows[-10:]])
  assert late < np.log(10) - 0.3, [round(r["clf_loss"], 3) for r in rows]


def test_probe_chooses_its_layers_on_a_subsample_and_leaves_out_a_baseline(pretrained, tmp_path):
  """probe.select_examples: every layer fitted on a subsample (its own features, in
  probe/select/), then only the best layer extracted and fitted on the whole splits;
  probe.baselines=pixels: no random-init model extracted or reported. The disk the features
  take is said before extracting."""
  workdir = tmp_path / "run"
  shutil.copytree(pretrained, workdir)
  config = stage_config("probe")
  config.probe.layers, config.probe.concat, config.probe.select_examples = "all", 1, 120
  config.probe.baselines = "pixels"
  logged = []
  pr = probe.run(config, str(workdir), log=logged.append)
  results = json.load(open(pr["results"]))
  selection = results["selection"]
  assert selection["examples"] == 120 and selection["validation_examples"] == 120
  assert [r["layer"] for r in selection["by_layer"]] == [1, 2]
  best = max(selection["by_layer"], key=lambda r: (r["val_accuracy"], -r["layer"]))["layer"]
  assert selection["layers"] == [best] and results["layers"] == [best]
  assert [r["layer"] for r in results["by_layer"]] == [best] and results["train_examples"] == 300
  assert results["random_init_accuracy"] is None and results["random_init_by_layer"] == []
  assert results["raw_pixel_accuracy"] > 0.3
  features_dir = workdir / "probe" / "features"
  assert sorted(p.name for p in features_dir.iterdir()) == [
      f"{n}-{s}" for n in ("pixels", "pretrained") for s in ("test", "train", "validation")]
  assert json.loads((workdir / "probe" / "select" / "features" / "pretrained-train" /
                     "meta.json").read_text())["num_examples"] == 120
  assert "not run (probe.baselines)" in (workdir / "probe" / "results.md").read_text()
  said = [line for line in logged if line.startswith("probe: extracting")]
  assert len(said) == 2 and "stores pixels, pretrained)" in said[1] and " MB in " in said[1]
  assert "stores pretrained)" in said[0]  # the subsample: no baselines


def test_finetuning_from_the_probes_head_starts_at_the_probes_accuracy_and_keeps_it(
    pretrained, tmp_path):
  """LP-FT: the class head starts as the last-layer probe, so step 0 classifies the validation
  split exactly as that probe does (the probe stage's own last-layer result, up to its float16
  feature store), and fine-tuning from there does not lose it."""
  workdir = str(tmp_path / "run")
  shutil.copytree(pretrained, workdir)
  config = stage_config("finetune")
  config.data.validation_fraction = 0.025  # 1,500 validation images, all of them evaluated
  config.probe.train_examples, config.probe.validation_examples = 2000, 0
  config.probe.layers = "all"
  config.finetune.steps, config.finetune.warmup_steps, config.finetune.eval_every = 30, 3, 30
  config.finetune.eval_batches, config.train.batch_size = 0, 64  # the demo's batch
  config.finetune.head_bias = True  # the probe stage's fit has an intercept: the same model
  ft = loop.finetune(config, workdir, log=QUIET)
  rows = [json.loads(l) for l in open(os.path.join(workdir, "finetune", "metrics.jsonl"))]
  start = rows[0]
  assert start["step"] == 0 and start["head_probe_validation_examples"] == 1500
  # The head's logits are the standardised probe's, rewritten: the same argmax on 1,500 images.
  assert start["eval_accuracy"] == pytest.approx(start["head_probe_val_accuracy"], abs=1.5 / 1500)
  assert start["eval_accuracy"] > 0.3  # 10 classes: far above chance even after 8 steps
  assert ft["head_probe"]["start_eval_accuracy"] == start["eval_accuracy"]

  pr = probe.run(config, workdir, log=QUIET)
  last_layer = json.load(open(pr["results"]))["by_layer"][-1]
  assert last_layer["layer"] == 2
  assert start["eval_accuracy"] == pytest.approx(last_layer["val_accuracy"], abs=0.01)

  # Not below the probe it started from, within 0.5% (8 of 1,500 images): on this 8-step model
  # the default recipe ends at 0.5260 from 0.5213; on the demo's model it ends above
  # (experiments/finetune_sweep.md). A trunk at the old 1e-3 ends far below on both.
  assert ft["step"] == 30 and ft["eval_accuracy"] >= start["eval_accuracy"] - 0.005, (start, ft)


def test_report_says_holds_only_beyond_what_the_test_images_can_tell(tmp_path):
  from igpt_jax.stages import all as all_stage
  results = tmp_path / "results.json"
  results.write_text(json.dumps({"test_examples": 5000, "by_layer": [
      {"layer": 1, "accuracy": 0.76}, {"layer": 2, "accuracy": 0.7708}]}))
  probe_out = {"results": str(results), "best_layer": 2, "best_accuracy": 0.7708,
               "random_init_accuracy": 0.6622, "raw_pixel_accuracy": 0.8074}
  finetune_out = {"test_accuracy": 0.7641, "test_examples": 10_000, "eval_accuracy": 0.7688,
                  "eval_examples": 2560, "head_probe": {"start_eval_accuracy": 0.7723}}
  out = all_stage.summary({
      "probe": probe_out, "finetune": finetune_out, "minutes": 1.0,
      "evaluate": {"test_bits_per_dim": 1.4, "test_loss": 0.97},
      "sample": {"unconditional": "u.png", "completions": "c.png"}}, str(tmp_path))
  assert "- Holds: pretrained features beat a random-init model (0.7708 vs 0.6622)." in out
  assert "- Does not hold here: pretrained features beat raw pixels" in out
  # -0.0067 with a standard error of 0.0073: not a finding either way.
  assert ("- Not resolved at this size: fine-tuning beats the best linear probe (0.7641 vs "
          "0.7708, a difference of -0.0067 within twice its standard error 0.0073") in out
  finetune_out["test_accuracy"] = 0.74
  out = all_stage.summary({"probe": probe_out, "finetune": finetune_out, "minutes": 1.0,
                           "evaluate": {"test_bits_per_dim": 1.4, "test_loss": 0.97},
                           "sample": {"unconditional": "u", "completions": "c"}}, str(tmp_path))
  assert ("Why at this scale: fine-tuning moved the head's validation accuracy from 0.7723 (the "
          "last layer's probe) to 0.7688 (-9 of 2,560 images)") in out


def test_a_finished_stage_reports_its_result_again(tmp_path):
  """`all` on a tiny numpy data set; then `finetune` again (nothing left to train) reports the
  same test accuracy, from its result file or, without it, by evaluating the saved state; and
  `all` again writes the same report: never a blank or a nan."""
  from test_cli import cli_many
  from test_multihost import TINY, make_uneven_numpy_source
  make_uneven_numpy_source(tmp_path / "data.npz")
  run = [*TINY, "--config.data.source=numpy", f"--config.data.path={tmp_path / 'data.npz'}",
         "--config.train.steps=8", "--config.train.eval_every=4", "--config.train.batch_size=4",
         "--config.finetune.steps=4", "--config.finetune.eval_every=4", "--config.probe.steps=20",
         "--config.sample.num=2", "--config.sample.completions=2",
         "--config.palette.samples=5000", f"--workdir={tmp_path / 'run'}"]
  first = cli_many((*run, "--config.stage=all"))[0]
  assert first.returncode == 0, first.stderr[-3000:]
  accuracy = json.loads(first.stdout.splitlines()[-1])["finetune_accuracy"]
  assert 0 <= accuracy <= 1
  report = (tmp_path / "run" / "report.md").read_text()
  again = cli_many((*run, "--config.stage=finetune"))[0]
  assert again.returncode == 0, again.stderr[-3000:]
  assert json.loads(again.stdout.splitlines()[-1]).get("test_accuracy") == accuracy
  assert "finetune: already trained to step 4" in again.stdout
  os.remove(tmp_path / "run" / "finetune" / "result.json")
  recomputed, rerun = cli_many((*run, "--config.stage=finetune"), (*run, "--config.stage=all"))
  for out in (recomputed, rerun):
    assert out.returncode == 0, out.stderr[-3000:]
  assert "evaluating the saved state" in recomputed.stdout
  assert json.loads(recomputed.stdout.splitlines()[-1])["test_accuracy"] == accuracy
  assert json.loads(rerun.stdout.splitlines()[-1])["finetune_accuracy"] == accuracy
  again_report = (tmp_path / "run" / "report.md").read_text()
  assert "nan" not in again_report
  def finetuned(text):
    return next(line for line in text.splitlines() if "Fine-tuned test accuracy" in line)
  assert finetuned(again_report) == finetuned(report)
