"""Your own images, start to finish on a laptop's CPU in minutes: a folder of class subfolders
(root/<class>/*.jpg; a folder of images without subfolders pretrains only).

  python -m igpt_jax.main --config=folder --config.data.path=DIR --workdir=runs/mine

runs stage all: a 64-colour RGB palette fitted on your images; 4 layers of width 128 pretrained
on 16x16 versions (256 tokens an image; images are stored at 32x32 and cropped as the paper
crops); bits/dim on the held-out test images (a stable 10% of the files); a linear probe of
every layer against raw pixels and a random-init model; fine-tuning from the last layer's probe;
samples and completions; report.md in the workdir. Every later stage needs only
--workdir=runs/mine (the run's saved config). Sized for a few hundred to a few thousand images;
README's "Your own images" says what to change for more data, a GPU or a pod.
"""
from igpt_jax.config import base_config


def get_config():
  c = base_config()
  c.stage = "all"
  c.data.source = "folder"
  c.data.path = ""  # your folder: --config.data.path=DIR
  c.data.resolution = 16
  c.data.channels = 3
  c.palette.k = 64
  c.palette.samples = 100_000
  c.model.num_layers, c.model.d_model, c.model.num_heads = 4, 128, 4
  c.train.steps = 300
  c.train.batch_size = 32
  c.train.lr = 3e-3
  c.train.warmup_steps = 30
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.eval_batches = 20  # 640 validation images at most
  c.checkpoint.every = 100
  c.finetune.steps = 100
  c.finetune.warmup_steps = 10
  c.finetune.eval_every = 50
  c.finetune.eval_batches = 20
  c.probe.train_examples = 5_000  # of the train split, at most
  c.probe.test_examples = 5_000
  c.probe.validation_examples = 1_000  # chooses L2 and the best layer
  c.sample.num = 16
  c.sample.completions = 8
  return c
