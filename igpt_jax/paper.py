"""The paper's evaluation protocols as configs, and the figures it reports for them.

Chen et al., "Generative Pretraining from Pixels" (ICML 2020): linear probes (Table 1),
fine-tuning (Table 2) and low-data linear probes on CIFAR-10 (Table 4), all with iGPT-L at 32x32
and OpenAI's 512-colour palette. The paper prints no S or M figure for these (its Figure 3 plots
them); `configs/eval/*.py` build on `eval_config` below, and README's "Reproduce the paper"
section lists the commands.
"""

from __future__ import annotations

# (data set, protocol) -> {model size: top-1 accuracy in percent}, as printed in the paper.
RESULTS = {
    ("cifar10", "probe"): {"l": 96.3},
    ("cifar10", "finetune"): {"l": 99.0},
    ("cifar100", "probe"): {"l": 82.8},
    ("cifar100", "finetune"): {"l": 88.5},
    ("stl10", "probe"): {"l": 95.5},
    ("stl10", "finetune"): {"l": 97.1},
}
# CIFAR-10 linear probes on a few labels per class, iGPT-L: mean and std over draws.
LOW_DATA_CIFAR10 = {4: (73.2, 1.5), 25: (87.6, 0.6), 400: (94.3, 0.1)}

# OpenAI's released checkpoints (github.com/openai/image-gpt, download.py): 32x32, k=512.
RELEASED = {"s": (24, 512, 8), "m": (36, 1024, 8), "l": (48, 1536, 16)}  # layers, d, heads
RELEASED_URL = "https://openaipublic.blob.core.windows.net/image-gpt"
DATASETS = ("cifar10", "cifar100", "stl10")


def eval_config(dataset: str, size: str = "l"):
  """The shipped igpt_<size> config (its mesh, precision and batch) set up for the paper's
  probe and fine-tuning on `dataset` through TFDS: 32x32 RGB, 512 colours (from the released
  weights' kmeans_centers.npy, or the workdir's own palette), every layer probed where the
  model is small enough ('auto' otherwise), L2 chosen on the 10% validation hold-out."""
  import os

  from igpt_jax.config import UserError, load_config_file
  size = (size or "l").lower()
  if size not in RELEASED:
    raise UserError(f"--config=eval/{dataset}.py:{size}: the model size is one of "
                    f"{', '.join(RELEASED)} (the released iGPT-S, M, L).")
  c = load_config_file(os.path.join(os.path.dirname(__file__), "configs", f"igpt_{size}.py"))
  c.stage = "probe"
  c.data.source, c.data.name = "tfds", dataset
  c.data.resolution, c.data.channels, c.palette.k = 32, 3, 512
  c.data.validation_fraction = -1.0  # the paper's 10% of CIFAR's (and STL-10's) train split
  c.model.num_layers, c.model.d_model, c.model.num_heads = RELEASED[size]
  c.probe.layers = "auto"
  c.probe.labels_per_class = "4,25,400" if dataset == "cifar10" else ""
  c.probe.low_data_seeds = 5
  c.finetune.steps = 3_520  # ~10 epochs of 45k images at batch 128: a start, not the paper's
  return c


def figure(dataset: str, protocol: str, size: str) -> float | None:
  """The paper's accuracy (%) for this data set, protocol and size, or None if it gives none."""
  return RESULTS.get((dataset, protocol), {}).get(size)
