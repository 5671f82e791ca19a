"""igpt_jax: Image GPT pretraining, probes, fine-tuning and sampling.

  python -m igpt_jax.main --config=configs/demo.py --config.stage=STAGE [--workdir=DIR]
                          [--config.FIELD=VALUE ...]

Stages (--config.stage): prepare, fit_palette, pretrain, evaluate, probe, finetune, sample,
export, plan, all.
Every stage writes under --workdir (default: runs/<config>-<timestamp>; gs://... works), says
where its outputs went, and prints one JSON object as its last stdout line.

Several processes (one per host, or per GPU): --coordinator_address=HOST:PORT --process_count=N
--process_index=I, or nothing on TPU VMs, GKE and SLURM, where JAX finds its peers itself.
launch/local.sh -n N runs N processes on this machine.

Most used overrides:
  --config.train.steps=N           --config.train.batch_size=N     --config.train.lr=X
  --config.model.num_layers=N      --config.model.d_model=N        --config.model.dtype=bfloat16
  --config.model.attention=splash  --config.model.remat=full       --config.model.objective=bert
  --config.data.source=folder      --config.data.path=DIR          --config.data.name=cifar10
  --config.data.prepared=DIR       --config.data.source=prepared   --config.data.augment=paper
  --config.mesh.fsdp=-1            --config.plan.num_devices=256   --config.checkpoint.every=N
A misspelt field stops at once, naming the closest valid one.
"""

import datetime
import json
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from igpt_jax import config as config_lib
from igpt_jax import distributed
from igpt_jax import stages
from igpt_jax import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config: a file's path, or the name of "
                                          "a shipped one (demo, igpt_s, igpt_m, igpt_l, igpt_xl).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the run writes its outputs "
                               "(default: runs/<config>-<timestamp>); local or gs://.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0, for a multi-process run.")
_PROCESS_COUNT = flags.DEFINE_integer("process_count", None, "Number of processes.")
_PROCESS_INDEX = flags.DEFINE_integer("process_index", None, "This process's index, 0..N-1.")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout_seconds", 60,
                                  "A process silent this long is declared dead and the others "
                                  "stop with an error (multi-process runs).")
_SHOW_CONFIG = flags.DEFINE_boolean(
    "show_config", False, "Print every config field with its value (after overrides) and what it "
    "means, then exit.")
_BARRIER_TIMEOUT = flags.DEFINE_integer(
    "barrier_timeout_seconds", 3600, "A process that has not reached a barrier this long after "
    "the first is named and every process stops (multi-process runs).")


def log(msg: str) -> None:
  print(msg, flush=True)


def simulate_cpu_devices(n: int) -> None:
  """Must run before JAX starts its backend: the plan stage then sees n CPU devices."""
  flags_now = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = (flags_now + f" --xla_force_host_platform_device_count={n}").strip()
  os.environ["JAX_PLATFORMS"] = "cpu"


CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")  # shipped
READS_A_RUN = ("evaluate", "probe", "finetune", "sample")  # need an earlier stage's workdir


def default_workdir(config_path: str) -> str:
  name = os.path.splitext(os.path.basename(config_path or "run"))[0]
  return os.path.join("runs", f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}")


def save_run_config(config, workdir) -> dict:
  """Writes the stage's config to config.<stage>.json (and config.json, the run's first, when
  there is none): a stage killed midway is resumed with `--workdir` alone. -> {path: the text
  it had before, None where there was no file}, to put back if the stage refuses to run."""
  text = config.to_json_best_effort(indent=2)
  out = {}
  for name in (f"config.{config.stage}.json", "config.json"):
    path = workdir_lib.path(workdir) / name
    out[path] = path.read_text() if path.exists() else None
    if name == f"config.{config.stage}.json" or out[path] is None:
      workdir_lib.write_text(path, text)
    else:
      del out[path]  # the run's first config stays
  return out


def run(config, workdir: str) -> dict:
  stage = config.stage
  config_lib.validate(config)
  if stage not in stages.NAMES:
    raise config_lib.UserError(f"Stage {stage!r} is not available in this version of igpt_jax.")
  outputs = config.data.prepared if stage == "prepare" else workdir  # prepare makes no run
  if stage not in ("prepare", "plan"):
    workdir = distributed.from_chief("workdir", workdir)  # a default one has a timestamp
    workdir_lib.check_same_workdir(workdir)
    stages.check_same_run(config, workdir)  # before its saved configs are written
    outputs = workdir
  saved = save_run_config(config, workdir) if stage != "prepare" else {}
  try:
    if config.init_from and stage in ("pretrain", "evaluate", "probe", "finetune", "sample",
                                      "all"):
      config = stages.from_released(config, workdir, log=log)
    result = stages.get(stage)(config, workdir, log=log)
  except config_lib.UserError:  # refused: the run's saved configs stay what they were
    for path, before in saved.items():
      if before is None:
        workdir_lib.remove(path)
      else:
        workdir_lib.write_text(path, before)
    raise
  log(f"{stage} done; outputs in {workdir_lib.path(outputs)}")
  print(json.dumps(result), flush=True)
  return result


def exit_with_error(message: str) -> None:
  """One line on stderr, exit status 2: the CLI's answer to anything the user can fix."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.exit(2)


def check_overrides(argv: list[str]) -> None:
  """One `error:` line, before absl or ml_collections see them, for: a --config file that does
  not exist, a `--config.a.b=...` whose key the config lacks (naming the closest valid key), and
  a value that does not parse as the field's type (absl would say FATAL and exit 1)."""
  import difflib

  index = _flag_index(argv, "--config")
  path = None if index is None else _flag_value(argv[index])
  if path and not os.path.isfile(path.split(":")[0]):
    names = sorted(f for f in os.listdir(CONFIGS_DIR) if f.endswith(".py") and f[0] != "_")
    typed = os.path.basename(path.split(":")[0])
    close = difflib.get_close_matches(typed if typed.endswith(".py") else typed + ".py", names, n=1)
    if close and os.path.dirname(path):
      close = [os.path.join(os.path.dirname(path), close[0])]
    elif close and not typed.endswith(".py"):
      close = [close[0][:-3]]
    exit_with_error(f"--config={path}: no such file."
                    + (f" Did you mean {close[0]}?" if close else "")
                    + f" The shipped configs ({CONFIGS_DIR}): "
                    + ", ".join(n[:-3] for n in names) + ".")
  overrides = [a[len("--config."):].split("=", 1) for a in argv if a.startswith("--config.")]
  if not path:
    return
  try:  # a config's own refusal (e.g. eval/cifar10:xl) as one line, not absl's FATAL
    config = config_lib.load_config_file(path)
  except config_lib.UserError as e:
    exit_with_error(str(e))
  if not overrides:
    return
  keys = _flat_keys(config)
  for key, *value in overrides:
    if key not in keys:
      close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
      hint = f" Did you mean --config.{close[0]}?" if close else ""
      exit_with_error(f"--config.{key} is not a field of {path}.{hint}")
    default = config
    for part in key.split("."):
      default = default[part]
    if value and type(default) in (int, float, bool) and not _parses_as(value[0], type(default)):
      exit_with_error(f"--config.{key}={value[0]}: expects {type(default).__name__} "
                      f"(default {default!r}).")


def check_flags(argv: list[str]) -> None:
  """A flag that does not exist (--work_dir) as one `error:` line naming the closest one, where
  absl would say FATAL and exit 1."""
  import difflib
  known = set(flags.FLAGS)  # ours, absl's and those of the libraries imported so far
  for arg in argv:
    name = arg[2:].split("=", 1)[0]
    if not arg.startswith("--") or not name or name.startswith("config.") or name in known:
      continue
    if name.startswith("no") and name[2:] in known:  # --noshow_config
      continue
    ours = [f.name for f in flags.FLAGS.get_key_flags_for_module(sys.modules[__name__])]
    close = difflib.get_close_matches(name, ours, n=1) or difflib.get_close_matches(name, known, n=1)
    exit_with_error(f"--{name}: no such flag." + (f" Did you mean --{close[0]}?" if close else "")
                    + " This program's flags: " + ", ".join(f"--{f}" for f in sorted(ours))
                    + " (and --config.FIELD=VALUE; --help says more).")


SAVED_CONFIG = os.path.join(CONFIGS_DIR, "_saved.py")  # reads a config.json every stage writes


def with_run_config(argv: list[str]) -> list[str]:
  """Without --config, `--workdir=W` runs with W's saved config (overrides still apply):
  `config.<stage>.json` when W ran that stage before, else `config.json`, the run's first. A
  newcomer's later stages then need no override retyped."""
  if _flag_index(argv, "--config") is not None:
    return argv
  index = _flag_index(argv, "--workdir")
  workdir = None if index is None else _flag_value(argv[index])
  if workdir is None:
    exit_with_error("--config is required, e.g. --config=demo (a shipped config), a config "
                    "file, or a run's saved config.json; or give --workdir=DIR of a run to use "
                    "its config.")
  stage = next((a.split("=", 1)[1] for a in argv if a.startswith("--config.stage=")), None)
  run_dir = workdir_lib.path(workdir)
  saved = [run_dir / f"config.{stage}.json"] if stage else []
  found = next((p for p in saved + [run_dir / "config.json"] if p.exists()), None)
  if found is None:
    exit_with_error(f"--workdir={workdir} holds no config.json (no stage has run there): give "
                    "--config, e.g. --config=demo.")
  print(f"Config: {found} (the run's; --config.FIELD=VALUE overrides it).", flush=True)
  return [f"--config={found}", *argv]  # before the overrides that apply to it


def with_packaged_config(argv: list[str]) -> list[str]:
  """`--config=igpt_l` (or `igpt_l.py`, or `eval/cifar10:l`) names a config shipped inside the
  package, so a pip install without this repository's checkout has them; a path to a file that
  exists is used as it is."""
  index, out = _flag_index(argv, "--config"), list(argv)
  name = None if index is None else _flag_value(argv[index])
  if name is not None and name.endswith(".json"):  # a run's saved config (any stage writes one)
    if "://" not in name and not os.path.isfile(name):
      exit_with_error(f"--config={name}: no such file.")
    saved = name if "://" in name else os.path.abspath(name)
    out[index] = out[index].replace(name, f"{SAVED_CONFIG}:{saved}", 1)
  elif name is not None and not os.path.isfile(name.split(":")[0]):
    base, _, rest = name.partition(":")  # also a shipped subfolder: eval/cifar10
    shipped = os.path.join(CONFIGS_DIR, base if base.endswith(".py") else base + ".py")
    if os.path.isfile(shipped):
      out[index] = out[index].replace(name, shipped + (":" + rest if rest else ""), 1)
  return out


def _flag_index(argv: list[str], flag: str) -> int | None:
  """Where `flag`'s value is in argv: `--flag=X` itself, or the word after `--flag`."""
  for i, arg in enumerate(argv):
    if arg.startswith(flag + "="):
      return i
    if arg == flag and i + 1 < len(argv):
      return i + 1
  return None


def _flag_value(arg: str) -> str:
  """The value in `--flag=X`, or the word X itself."""
  return arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg



def _parses_as(text: str, kind: type) -> bool:
  if kind is bool:
    return text.lower() in ("true", "false", "1", "0")
  try:
    kind(text)
  except ValueError:
    return False
  return True


def _flat_keys(config, prefix: str = "") -> list[str]:
  keys = []
  for name, value in config.items():
    keys.append(prefix + name)
    if hasattr(value, "items"):
      keys += _flat_keys(value, prefix + name + ".")
  return keys


def devices_needed(mesh_config) -> int:
  """The fewest devices the configured mesh can run on (axes of -1 count as 1)."""
  import math
  return math.prod(max(1, int(mesh_config[axis])) for axis in ("data", "fsdp", "tensor"))


def plan_devices_needed(config) -> int:
  """Simulated CPU devices a GPU target's plan compiles for (0: none needed). TPU targets bring
  their own compile-only devices."""
  if not config.plan.target or config.plan.num_devices:
    return 0
  from igpt_jax import targets
  target = targets.parse(config.plan.target)
  return target.chips if target.platform == "gpu" and not targets.has_cuda_compiler() else 0


def replan_with_simulated_devices(config, needed: int) -> None:
  """plan on a machine with too few devices: run again with `needed` simulated CPU devices."""
  import jax
  log(f"plan: the mesh needs {needed} devices and {len(jax.devices())} are here; "
      f"planning on {needed} simulated CPU devices.")
  argv = [a for a in sys.argv[1:] if not a.startswith("--config.plan.num_devices")]
  os.execv(sys.executable, [sys.executable, "-m", "igpt_jax.main", *argv,
                            f"--config.plan.num_devices={needed}"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # library chatter (Orbax saves) off; our lines stay
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
  config = _CONFIG.value
  if _SHOW_CONFIG.value:
    print(config_lib.describe(config))
    return
  from igpt_jax import targets
  targets.quiet_libtpu_without_tpu()  # before JAX starts its backends
  targets.set_libtpu_flags()  # the TPU run and its plan compile with the same flags
  if config.stage == "plan" and config.plan.target:
    # Compile-only devices need no accelerator: leave this machine's TPU or GPU to its jobs.
    import jax
    if not os.environ.get("JAX_PLATFORMS"):
      jax.config.update("jax_platforms", "cpu")
  try:
    if config.stage == "prepare":
      pass  # one process: it decodes with a pool of its own
    elif config.stage == "plan":
      needed = plan_devices_needed(config)
      if config.plan.num_devices:
        simulate_cpu_devices(config.plan.num_devices)
      elif needed:
        replan_with_simulated_devices(config, needed)
      elif not config.plan.target:
        import jax
        if len(jax.devices()) < devices_needed(config.mesh):
          replan_with_simulated_devices(config, devices_needed(config.mesh))
    else:  # plan compiles on this process alone; every other stage joins its peers
      from igpt_jax import goodput
      began = time.time()
      distributed.initialize(_COORDINATOR.value, _PROCESS_COUNT.value, _PROCESS_INDEX.value,
                             _HEARTBEAT.value)
      goodput.TIMELINE.remember("distributed_init", began, time.time())
      distributed.BARRIER_TIMEOUT_S = _BARRIER_TIMEOUT.value
    if config.stage != "plan":  # SIGTERM and Ctrl-C stop any stage at its next safe point
      distributed.PREEMPTION.install()
    workdir = _WORKDIR.value
    if workdir is None:
      if config.stage in READS_A_RUN:
        raise config_lib.UserError(
            f"--config.stage={config.stage} reads a pretraining run's checkpoint: give that "
            "run's --workdir=DIR.")
      workdir = default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
      if config.stage not in ("prepare", "plan"):
        log(f"No --workdir: starting from scratch in {workdir} (pass --workdir={workdir} to "
            "resume or continue this run).")
    run(config, workdir)
  except config_lib.UserError as e:  # includes data, palette and checkpoint mismatches
    exit_with_error(str(e))
  except distributed.Preempted as e:  # kept what it finished; a supervisor reruns the command
    why = distributed.PREEMPTION.signal or "a preemption notice"
    log(f"{e.result.get('stage', config.stage)}: stopped ({why}); what it finished is kept. "
        f"Exiting with status {distributed.EXIT_PREEMPTED}: run the same command again to "
        "continue.")
    print(json.dumps({**e.result, "preempted": True}), flush=True)
    sys.exit(distributed.EXIT_PREEMPTED)
  except config_lib.RunFailed as e:  # diverged, unreadable storage, a dead peer: one line
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    sys.exit(1)


def cli(args: list[str]) -> None:
  """The command line, arguments without the program name; ends in SystemExit with the exit
  status (0 done, 2 user error, 75 preempted). Tests call it in-process."""
  if any(a in ("-h", "--help", "-?") for a in args):  # absl would exit 1 on --help
    app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
  sys.argv[1:] = with_packaged_config(with_run_config(args))  # plan's re-exec reads sys.argv
  check_flags(sys.argv[1:])
  check_overrides(sys.argv[1:])
  app.run(main, argv=list(sys.argv))


def exit_without_teardown(status) -> None:
  """Ends the process after its atexit handlers (jax.distributed's shutdown, logging's flush)
  and the goodput timeline's last span, but without the interpreter's teardown: destroying
  TensorFlow's and XLA's runtimes took ~1 s of every attempt's wall time (badput at every
  restart), and nothing needs it -- our files are closed and the streams are flushed here."""
  import atexit
  if status is None:
    status = 0
  elif not isinstance(status, int):  # SystemExit("message"): Python prints it and exits 1
    print(status, file=sys.stderr)
    status = 1
  atexit._run_exitfuncs()
  from igpt_jax import goodput
  goodput.TIMELINE.finish()  # the attempt's last span (jax.distributed's shutdown in it)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


if __name__ == "__main__":
  try:
    cli(sys.argv[1:])
  except SystemExit as e:
    exit_without_teardown(e.code)
