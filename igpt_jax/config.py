"""The run-config skeleton every `configs/*.py` starts from (the modules that read it:
docs/ARCHITECTURE.md).

Configs are code: a config file calls `base_config()`, changes what it needs and returns the
ConfigDict. The dict is locked, so a misspelt override on the command line is an error.
"""

import importlib.util
import os
import re

import ml_collections

class UserError(ValueError):
  """Something the user can fix (a path, a config value, a mismatched workdir). The CLI prints
  it as one line `error: ...` and exits 2, without a traceback."""


class RunFailed(RuntimeError):
  """A run that cannot go on for a reason its message explains in full (it diverged, storage
  would not serve a checkpoint, a peer process died): one `error:` line, exit status 1."""


STAGES = ("prepare", "fit_palette", "pretrain", "evaluate", "probe", "finetune", "sample", "plan",
          "export", "all")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # fit_palette | prepare | plan | pretrain | evaluate | probe | finetune | sample | export | all
  c.stage = "pretrain"
  c.seed = 0  # data order, crops, initialisation, sampling: one seed for all
  # Released weights to start from, where the workdir has no pretraining checkpoint: an OpenAI
  # checkpoint prefix (.../model.ckpt-N, kmeans_centers.npy beside it) or a Hugging Face
  # ImageGPT folder. Shape and palette come from the weights (released.py).
  c.init_from = ""

  c.data = ml_collections.ConfigDict()
  c.data.source = "tfds"  # prepared | fashion_mnist | tfds | folder | numpy
  c.data.name = "imagenet_resized/32x32"  # TFDS name when source == 'tfds'
  c.data.path = ""  # IDX files, image folder, .npz or TFDS data_dir; '' = the usual places
  c.data.prepared = ""  # a prepared data set (stage prepare writes it, source 'prepared' reads)
  c.data.resolution = 32  # the model's image side in pixels: resolution**2 tokens an image
  c.data.channels = 3  # 3 = RGB, 1 = gray (the palette's colours have as many values)
  # Training views (data/transform.py quotes the paper): 'paper' (short side 256..384, a random
  # 224 crop), 'wrn' (shifts of up to 4 of 32 pixels, reflection beyond the edge, mirrored half
  # the time: the paper's CIFAR fine-tuning), 'crop' (random square of crop_min..1 of the
  # side), 'none'. Evaluation always sees the whole centre square. 'auto' = paper for full-size
  # images (folders, imagenet2012); for data already at low resolution, wrn when fine-tuning
  # and none otherwise.
  c.data.augment = "auto"
  c.data.crop_min = 0.75  # smallest side of the 'crop' augmentation, as a fraction
  c.data.validation_fraction = -1.0  # held out of train; -1 = the paper's (ImageNet 4%, else 10%)
  c.data.shard_size = 10_000  # examples per prepared shard (the unit prepare resumes by)
  c.data.workers = 0  # prepare's decoding processes; 0 = all cores
  c.data.overwrite = False  # prepare into a directory made with other settings: start over
  c.data.verify = False  # check every prepared shard's sha256 when a run opens the set
  c.data.upsample = False  # allow images smaller than data.resolution (upsampled: blurred)
  c.data.prefetch = 2  # batches read ahead (0 = tf.data's AUTOTUNE, or none without TF)
  # 'auto' = tf.data where TensorFlow is installed, else 'python' (a thread); same batches.
  c.data.pipeline = "auto"

  c.palette = ml_collections.ConfigDict()
  c.palette.k = 512  # colours in the k-means palette: the vocabulary (the paper: 512)
  c.palette.path = ""  # '' = <workdir>/palette.npz
  c.palette.samples = 500_000  # pixels sampled from the pretraining split for k-means
  c.palette.iters = 30  # Lloyd iterations

  c.model = ml_collections.ConfigDict()
  c.model.num_layers = 24  # transformer blocks (iGPT S 24, M 36, L 48, XL 60)
  c.model.d_model = 512  # width (S 512, M 1024, L 1536, XL 3072)
  c.model.num_heads = 8  # attention heads; must divide d_model
  c.model.mlp_ratio = 4.0  # MLP width / d_model
  c.model.objective = "ar"  # ar | bert
  c.model.use_bias = False  # True only for converted transformers checkpoints
  c.model.num_classes = 0  # > 0 adds the fine-tuning class head
  c.model.dtype = "float32"  # compute dtype; params stay float32
  # auto (the platform's best: splash on TPU, cudnn on GPU at 16-bit, blocked on CPU) | xla |
  # blocked (causal, CPUs) | splash (Pallas, TPU; interpreted on CPU) | cudnn (flash, GPU, bf16)
  c.model.attention = "auto"
  c.model.splash_block_q = 512  # splash tiles in tokens: multiples of 128, capped at seq_len
  c.model.splash_block_kv = 512  # splash key/value tile (same rules as splash_block_q)
  # none | full | a jax.checkpoint_policies name | save:NAME,... | offload:NAME,... (TPU), with
  # NAME among query, key, value, attention_out, mlp_hidden (the block's named activations)
  c.model.remat = "none"
  c.model.fused_qkv = False  # one stacked QKV matmul; parameters and checkpoints unchanged
  c.model.scan_layers = True  # False unrolls the layers (compile time grows with depth)

  # The paper: Adam(b1=0.9, b2=0.95), learning rate warmed up for one epoch, then cosine decay
  # to zero, no dropout; batch 128 for 1M steps (S/M/L). It swept the learning rate over
  # 0.01, 0.003, 0.001, ... per model, so `lr` here is a starting point, not the paper's value.
  c.train = ml_collections.ConfigDict()
  c.train.steps = 1_000_000  # optimizer steps; the schedule runs over them
  c.train.batch_size = 128  # global batch (all processes and devices together)
  c.train.lr = 1e-3  # peak learning rate (after warmup; cosine decay to zero)
  c.train.warmup_steps = 10_000  # linear warmup steps (the paper: ~one epoch of its data)
  c.train.b1 = 0.9  # Adam beta1
  c.train.b2 = 0.95  # Adam beta2
  c.train.weight_decay = 0.0  # AdamW decoupled weight decay (the paper: none)
  c.train.grad_clip = 1.0  # global gradient-norm clip; 0 = none
  c.train.accum_steps = 1  # micro-batches per step (gradient accumulation); divides batch_size
  c.train.log_every = 100  # steps between metrics rows (metrics.jsonl, TensorBoard, the log)
  c.train.eval_every = 5_000  # steps between validation evaluations (and at the end); 0 = none
  c.train.eval_batches = 0  # validation batches per evaluation; 0 = all of it
  # Unconditional samples to TensorBoard every N steps; 0 = off (the demo config turns it on).
  # Decoding is seq_len sequential steps (4,096 at 64x64), a large share of a big run's time;
  # when on, the log states each grid's cost.
  c.train.sample_every = 0
  # A step whose gradients or updates are not finite is skipped (never applied, never saved);
  # this many in a row stop the run, keeping the last good checkpoint.
  c.train.max_nonfinite_steps = 10
  # 'START,END': a jax.profiler trace of steps START..END under <workdir>/profile (TensorBoard's
  # profile tab); process 0 only unless profile_all_hosts.
  c.train.profile_steps = ""
  c.train.profile_all_hosts = False  # trace on every process, not only process 0
  # A step taking this many times the median step time dumps every thread's stack to stderr
  # (a hung host says where it hangs); 0 = off.
  c.train.watchdog_factor = 20.0

  # Fine-tuning: these fields replace train's; the rest of train applies as it is.
  c.finetune = ml_collections.ConfigDict()
  c.finetune.steps = 10_000  # fine-tuning steps (train.steps is pretraining's)
  # The trunk's peak learning rate. Small: from a probe-initialised head, trunk updates at 1e-4
  # and above lowered validation accuracy in experiments/finetune_sweep.md; 1e-5 raised it.
  c.finetune.lr = 1e-5
  c.finetune.warmup_steps = 500  # linear warmup steps of fine-tuning
  c.finetune.eval_every = 1_000  # steps between validation evaluations (and at the end); 0 = none
  c.finetune.eval_batches = 0  # validation batches per evaluation; 0 = all of it
  c.finetune.gen_weight = 1.0  # L_GEN + L_CLF as in the paper; 0 = plain L_CLF
  # 'probe': the class head starts as the last-layer linear probe (probe.train_examples,
  # probe.validation_examples and probe.l2 choose it), then everything is fine-tuned (LP-FT);
  # 'zeros': a zero head, as in the release.
  c.finetune.head_init = "probe"
  # The class head's bias. False (the release's `wclf`): logits = pooled features x weights, as
  # transformers' ImageGPTForImageClassification computes them, so an export predicts what this
  # model does (its probe is fitted without an intercept). True: a bias, which transformers drops.
  c.finetune.head_bias = False
  c.finetune.head_lr = 1e-3  # the class head's peak learning rate; < 0 = finetune.lr
  # BERT models: evaluation's class logits averaged over this many masks drawn as in
  # pretraining (the paper's mask ensembling); 0 = one mask, as in pretraining.
  c.finetune.bert_masks = 0

  c.probe = ml_collections.ConfigDict()
  c.probe.train_examples = 0  # 0 = the whole labelled train split
  c.probe.test_examples = 0  # 0 = the whole test split
  c.probe.validation_examples = 0  # 0 = the whole validation split (chooses L2 and the layer)
  # 'auto': all layers up to 12, else the middle third plus a spread of 8; 'all'; or '4,8,12'.
  c.probe.layers = "auto"
  c.probe.concat = 3  # the best layer and its nearest probed neighbours, concatenated (XL: 5)
  # > 0 (and a larger train split): every probed layer is fitted on this many train and validation
  # examples first; only the best layer and its probe.concat neighbours are then extracted and
  # fitted on the whole splits (ImageNet: 50,000, not 1.2M x every layer). 0 = all layers whole.
  c.probe.select_examples = 0
  # L2 candidates, chosen on the validation split; L-BFGS widens the grid 10x at a time (at
  # most 3 per side) while the choice is at its edge. One value: that L2, fixed.
  c.probe.l2 = (1e-4, 1e-3, 1e-2, 1e-1)
  # 'auto': full-batch L-BFGS when its peak (train+validation+test features as float32, a
  # second copy of the largest split while loading, the standardised copies: see
  # probe.in_memory_peak_bytes) fits in max_memory_mb, else mini-batch Adam streamed from the
  # feature store; or 'lbfgs' / 'adam'.
  c.probe.solver = "auto"
  c.probe.max_memory_mb = 2048  # host memory the probe's features may take
  c.probe.steps = 200  # L-BFGS iterations
  c.probe.epochs = 50  # Adam epochs (ill-conditioned features need many)
  c.probe.fit_batch_size = 1024  # Adam batch (global, over the mesh)
  c.probe.lr = 0.3  # Adam peak learning rate, warmup then cosine (features are standardised)
  c.probe.batch_size = 256  # feature extraction
  # The report's baselines: 'all' (raw pixels and the same probe on a random-init model),
  # 'pixels' (no random-init model: half the extraction, which matters at ImageNet size), 'none'.
  c.probe.baselines = "all"
  # BERT models: features averaged over this many masks drawn as in pretraining (the paper's
  # mask ensembling); 0 = unmasked inputs, once. AR models ignore it.
  c.probe.bert_masks = 0
  # Low-data probes (the paper's semi-supervised comparison): '4,25,400' fits each probed layer
  # on that many labelled train examples per class as well, with probe.low_data_seeds draws
  # each, L2 chosen on validation; reported as mean and std. '' = none.
  c.probe.labels_per_class = ""
  c.probe.low_data_seeds = 3  # draws of each low-data train subset

  c.sample = ml_collections.ConfigDict()
  c.sample.num = 16  # unconditional samples
  c.sample.completions = 8  # test images whose bottom half is completed
  c.sample.temperature = 1.0  # softmax temperature; < 1 sharper, > 1 more varied
  c.sample.top_k = 0  # 0 = sample from the full distribution

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 5_000  # steps between checkpoints (also the last step and a preemption's)
  c.checkpoint.keep = 3  # newest checkpoints kept
  # Stages that read the pretrained model (evaluate, probe, finetune, sample): 0 = its newest
  # intact step; N = exactly step N (kept by checkpoint.keep), e.g. to probe how features grow.
  c.checkpoint.load_step = 0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1 = all remaining devices
  c.mesh.fsdp = 1  # devices the parameters and optimizer state are sharded over (ZeRO-3)
  c.mesh.tensor = 1  # devices each layer's matmuls are split over (heads, MLP width)
  c.mesh.slices = 1  # > 1: data parallel across that many slices over DCN (multislice)

  c.export = ml_collections.ConfigDict()
  c.export.path = ""  # the Hugging Face folder stage export writes; '' = <workdir>/hf
  # 'user/name': also upload the folder to that Hugging Face Hub model repo (created if it is
  # not there; private unless export.public), with huggingface_hub's token (HF_TOKEN or
  # `hf auth login`). Needs `pip install igpt_jax[hub]`.
  c.export.push_to_hub = ""
  c.export.public = False  # push_to_hub: a public repo (a new repo is private otherwise)

  c.plan = ml_collections.ConfigDict()
  c.plan.num_devices = 0  # > 0: simulate that many CPU devices for planning
  # GiB per device the step must fit, searched for when it does not; 0 = this machine's devices'
  # own memory (a GPU's, a CPU's free RAM), none for simulated devices.
  c.plan.device_memory_gb = 0.0
  # An accelerator to compile for with its own compiler (TPU: libtpu, no TPU needed):
  # v4-32, v5litepod-64, v5p-128, v6e-64; GPUs (h100, h200-8, a100-80gb): XLA's CUDA compiler
  # where jax's CUDA plugin is installed (no GPU needed), else a CPU-compiled estimate.
  c.plan.target = ""
  c.plan.slices = 0  # slices of the target; 0 = mesh.slices
  # When the step does not fit (or fits a target with room to spare), search the settings a
  # user can change for the best-estimated one that fits, and print it as --config. overrides.
  c.plan.search = True
  # FLOPs and HBM bytes per step from the compiler, and the roofline step time and MFU they
  # imply: two more (small) compiles.
  c.plan.roofline = True

  c.lock()
  return c


# The block's named activations (model.py and attention.py tag them), for remat policies that
# save or offload only these: --config.model.remat=save:query,key,value.
CHECKPOINT_NAMES = ("query", "key", "value", "attention_out", "mlp_hidden")
SPLASH_LANES = 128  # splash attention's tiles are multiples of a TPU's 128 lanes


# jax.checkpoint_policies that are policies themselves (the others are factories that take
# names or policies: save:/offload: above spell those).
REMAT_POLICIES = ("dots_saveable", "dots_with_no_batch_dims_saveable", "checkpoint_dots",
                  "checkpoint_dots_with_no_batch_dims", "everything_saveable", "nothing_saveable")
ATTENTIONS = ("auto", "xla", "blocked", "splash", "cudnn")
OBJECTIVES = ("ar", "bert")
DTYPES = ("float32", "bfloat16")  # compute; float16 would need loss scaling


def remat_names(spec: str) -> tuple[str, tuple[str, ...]] | None:
  """'save:NAME,...' / 'offload:NAME,...' -> (kind, names); None for any other spec (unknown
  activation names are `model_problem`'s to refuse)."""
  kind, _, names = spec.partition(":")
  if kind not in ("save", "offload") or not names:
    return None
  return kind, tuple(names.split(","))


def splash_shape_problem(seq_len: int, block_q: int, block_kv: int) -> str | None:
  """Why splash tiles (capped at the sequence) cannot tile `seq_len` tokens, or None."""
  for name, size in (("splash_block_q", block_q), ("splash_block_kv", block_kv)):
    block = min(size, seq_len)
    if block % SPLASH_LANES or seq_len % block:
      return (f"model.attention='splash' needs model.{name} (capped at the {seq_len} tokens) to "
              f"be a multiple of {SPLASH_LANES} that divides the sequence; got {size}. Use "
              "data.resolution >= 16 with a multiple-of-128 sequence, or another attention.")
  return None


def model_fields(config) -> dict:
  """The model's shape and numerics (model.ModelConfig's fields) from a run config."""
  m = config.model
  return dict(num_layers=m.num_layers, d_model=m.d_model, num_heads=m.num_heads,
              mlp_ratio=m.mlp_ratio, vocab_size=config.palette.k,
              seq_len=config.data.resolution ** 2, objective=m.objective, use_bias=m.use_bias,
              num_classes=m.num_classes, class_bias=bool(config.finetune.head_bias),
              dtype=m.dtype, attention=m.attention,
              splash_block_q=m.splash_block_q, splash_block_kv=m.splash_block_kv,
              remat=m.remat, fused_qkv=m.fused_qkv, scan_layers=m.scan_layers)


def model_problem(f: dict) -> str | None:
  """What is wrong with a model's fields (`model_fields`), in one sentence that starts with the
  field, or None. The one check of these fields: `validate` runs it on the run config before
  anything slow, and model.ModelConfig on itself."""
  for name in ("num_layers", "d_model", "num_heads", "mlp_ratio", "splash_block_q",
               "splash_block_kv"):
    if not f[name] > 0:
      return f"model.{name}={f[name]} must be positive."
  if not f["vocab_size"] > 0 or not f["seq_len"] > 0:
    return f"palette.k={f['vocab_size']} and data.resolution must be positive."
  for name, allowed in (("objective", OBJECTIVES), ("attention", ATTENTIONS), ("dtype", DTYPES)):
    if f[name] not in allowed:
      return f"model.{name}={f[name]!r} is not one of {', '.join(allowed)}."
  if f["d_model"] % f["num_heads"]:
    return (f"model.d_model={f['d_model']} is not divisible by "
            f"model.num_heads={f['num_heads']}.")
  if abs(round(f["d_model"] * f["mlp_ratio"]) - f["d_model"] * f["mlp_ratio"]) > 1e-6:
    return (f"model.mlp_ratio={f['mlp_ratio']}: d_model * mlp_ratio = "
            f"{f['d_model'] * f['mlp_ratio']} is not a whole number of units.")
  if f["attention"] == "cudnn" and f["dtype"] != "bfloat16":
    return ("model.attention='cudnn' (flash attention) needs model.dtype='bfloat16'; use "
            "model.attention='auto' for float32.")
  if f["attention"] == "splash":
    problem = splash_shape_problem(f["seq_len"], f["splash_block_q"], f["splash_block_kv"])
    if problem:
      return problem
  return _remat_problem(f["remat"])


def _remat_problem(spec: str) -> str | None:
  if spec in ("none", "full") or spec in REMAT_POLICIES:
    return None
  named = remat_names(spec)
  if named is not None:
    unknown = sorted(set(named[1]) - set(CHECKPOINT_NAMES))
    return (f"model.remat={spec!r}: unknown activation names {unknown}; the model names "
            f"{list(CHECKPOINT_NAMES)}." if unknown else None)
  import difflib
  close = difflib.get_close_matches(spec, ["none", "full", *REMAT_POLICIES], n=1)
  return (f"model.remat={spec!r} is none of 'none', 'full', 'save:NAME,...', 'offload:NAME,...'"
          f" or a jax.checkpoint_policies policy ({', '.join(REMAT_POLICIES)})"
          + (f"; did you mean {close[0]!r}?" if close else "."))


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Runs a configs/*.py file's `get_config()` (for code that has no absl flags to do it);
  'file.py:arg' passes arg, as --config does."""
  path, *args = path.split(":", 1) if not os.path.isfile(path) else (path,)
  spec = importlib.util.spec_from_file_location(
      "igpt_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


CHOICES = {
    "data.source": ("prepared", "fashion_mnist", "tfds", "folder", "numpy"),
    "data.augment": ("auto", "paper", "wrn", "crop", "none"),
    "data.pipeline": ("auto", "tf.data", "python"),
    "probe.solver": ("auto", "lbfgs", "adam"),
    "probe.baselines": ("all", "pixels", "none"),
    "finetune.head_init": ("probe", "zeros"),
}  # model.* choices: model_problem
POSITIVE = ("data.resolution", "data.shard_size", "palette.k", "palette.samples",
            "train.batch_size", "train.accum_steps",
            "train.log_every", "train.max_nonfinite_steps", "checkpoint.every", "checkpoint.keep",
            "probe.batch_size", "probe.steps", "probe.concat", "probe.max_memory_mb",
            "probe.epochs", "probe.fit_batch_size", "probe.lr", "mesh.slices",
            "probe.low_data_seeds")
NON_NEGATIVE = ("data.workers", "data.prefetch", "train.steps", "train.lr", "train.warmup_steps", "train.weight_decay",
                "train.grad_clip", "train.eval_every", "train.eval_batches", "train.sample_every",
                "finetune.steps", "finetune.lr", "finetune.warmup_steps", "finetune.eval_every",
                "finetune.eval_batches", "finetune.gen_weight", "palette.iters", "sample.num",
                "sample.completions", "sample.temperature", "sample.top_k", "plan.num_devices",
                "probe.train_examples", "probe.validation_examples", "probe.test_examples",
                "plan.device_memory_gb", "plan.slices", "train.watchdog_factor",
                "probe.bert_masks", "checkpoint.load_step", "finetune.bert_masks")


def _get(config, dotted: str):
  for part in dotted.split("."):
    config = config[part]
  return config


def field_help() -> dict[str, str]:
  """{'data.source': 'prepared | fashion_mnist | ...'}: each field's comment in `base_config`'s
  source (a trailing one, or the comment lines just above it), so the help cannot drift from
  the code that sets the default."""
  import inspect
  out, above = {}, []
  for line in inspect.getsource(base_config).splitlines():
    text = line.strip()
    if text.startswith("#"):
      above.append(text.lstrip("# "))
      continue
    match = re.match(r"c\.([\w.]+) = [^#]*?(?:#\s*(.*))?$", text)
    if match and "ConfigDict()" not in text:
      out[match.group(1)] = " ".join(above + ([match.group(2)] if match.group(2) else []))
    above = []
  return out


def describe(config) -> str:
  """Every field as `--config.FIELD=VALUE  # help`, in the config's order."""
  helps, lines = field_help(), []

  def walk(node, prefix=""):
    for name, value in node.items():
      if hasattr(value, "items"):
        walk(value, f"{prefix}{name}.")
        continue
      key = prefix + name
      lines.append(f"--config.{key}={value!r}" + (f"  # {helps[key]}" if helps.get(key) else ""))

  walk(config)
  return "\n".join(lines)


def validate(config) -> None:
  """Raises UserError, naming the field, for values no run could use."""
  if config.stage not in STAGES:
    import difflib
    close = difflib.get_close_matches(config.stage, STAGES, n=1)
    raise UserError(f"Unknown stage {config.stage!r};"
                    + (f" did you mean {close[0]!r}?" if close else "")
                    + f" The stages: {', '.join(STAGES)}.")
  for key, allowed in CHOICES.items():
    if _get(config, key) not in allowed:
      raise UserError(f"--config.{key}={_get(config, key)!r} is not one of {', '.join(allowed)}.")
  for key in POSITIVE:
    if not _get(config, key) > 0:
      raise UserError(f"--config.{key}={_get(config, key)} must be positive.")
  for key in NON_NEGATIVE:
    if not _get(config, key) >= 0:  # also refuses NaN
      raise UserError(f"--config.{key}={_get(config, key)} must be zero or positive.")
  problem = model_problem(model_fields(config))
  if problem:
    raise UserError(f"--config.{problem}")
  if config.data.channels not in (1, 3):
    raise UserError(f"--config.data.channels={config.data.channels} must be 1 or 3.")
  if not (config.data.validation_fraction == -1 or 0 <= config.data.validation_fraction < 1):
    raise UserError(f"--config.data.validation_fraction={config.data.validation_fraction} must "
                    "be in [0, 1), or -1 for the paper's per data set.")
  if not 0 < config.data.crop_min <= 1:
    raise UserError(f"--config.data.crop_min={config.data.crop_min} must be in (0, 1].")
  if config.palette.samples < config.palette.k:
    raise UserError(f"--config.palette.samples={config.palette.samples} is below "
                    f"--config.palette.k={config.palette.k}: k-means needs a pixel per colour at "
                    "least (and many more to place them well).")
  if config.train.batch_size % config.train.accum_steps:
    raise UserError(f"--config.train.batch_size={config.train.batch_size} is not divisible by "
                    f"--config.train.accum_steps={config.train.accum_steps}.")
  profile = config.train.profile_steps
  if profile and not re.fullmatch(r"\s*\d+\s*,\s*\d+\s*", profile):
    raise UserError(f"--config.train.profile_steps={profile!r} must be 'START,END', e.g. '10,20'.")
  if profile and int(profile.split(",")[0]) > int(profile.split(",")[1]):
    raise UserError(f"--config.train.profile_steps={profile!r}: START is after END.")
  labels_per_class(config)  # refuses a malformed list
  for axis in ("data", "fsdp", "tensor"):
    size = config.mesh[axis]
    if size != -1 and size < 1:
      raise UserError(f"--config.mesh.{axis}={size} must be a positive size or -1 (the rest).")


def labels_per_class(config) -> list[int]:
  """probe.labels_per_class as sorted positive ints ([] when unset)."""
  spec = str(config.probe.labels_per_class).strip().strip("()[]")
  try:
    values = sorted({int(v) for v in spec.replace(" ", "").split(",") if v})
  except ValueError:
    values = [0]
  if any(v < 1 for v in values):
    raise UserError(f"--config.probe.labels_per_class={config.probe.labels_per_class!r} must be "
                    "positive numbers of examples per class separated by commas, e.g. '4,25,400'.")
  return values
