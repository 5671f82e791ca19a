"""Run metrics: metrics.jsonl, TensorBoard events, a progress display, throughput and MFU.

TensorBoard events are written with tensorboard's own writer in its TensorFlow-free mode, so the
train path never imports TensorFlow.
"""

from __future__ import annotations

import json
import sys
import time
import types

import numpy as np

from igpt_jax import appendlog
from igpt_jax import workdir as workdir_lib

# Ask tensorboard for its bundled TF stub instead of importing TensorFlow (its documented switch
# is the presence of this module).
sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))

# Dense bf16 peak FLOP/s per chip, by jax device_kind prefix. CPUs have no entry: no MFU.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
}


def peak_flops(device_kind: str) -> float | None:
  matches = [k for k in PEAK_FLOPS if device_kind.startswith(k)]
  return PEAK_FLOPS[max(matches, key=len)] if matches else None


def mfu(tokens_per_s: float, flops_per_token: float, device_kind: str, num_devices: int):
  peak = peak_flops(device_kind)
  return None if peak is None else tokens_per_s * flops_per_token / (peak * num_devices)


def host_times(step_s: float, input_s: float) -> dict:
  """Every host's seconds per step and its own input time per step, gathered at a log step
  (a collective: every process calls it at the same step). In a synchronous step the hosts'
  step times agree -- the fast wait for the slow in collectives -- so the slowest host is the
  one spending most time on its own input."""
  import jax
  if jax.process_count() == 1:
    return {}
  from igpt_jax import distributed
  table = distributed.allgather(np.asarray([step_s, input_s], np.float64))
  slowest = int(np.argmax(table[:, 1]))
  return {"host_step_s_max": float(table[:, 0].max()), "host_step_s_min": float(table[:, 0].min()),
          "host_input_s_max": float(table[slowest, 1]),
          "host_input_s_median": float(np.median(table[:, 1])), "slowest_host": slowest}


def host_times_line(hosts: dict) -> str:
  return (f"hosts: {hosts['host_step_s_min']:.3f}-{hosts['host_step_s_max']:.3f} s/step; "
          f"slowest host: process {hosts['slowest_host']} (input {hosts['host_input_s_max']:.3f} "
          f"s/step, median host {hosts['host_input_s_median']:.3f})")


class MetricsWriter:
  """Appends one JSON object per logged step to metrics.jsonl and mirrors scalars (and images)
  to TensorBoard, on a writer thread (appendlog.Background): the loop never waits for storage.

  `enabled=False` on every process but 0. The directory may be remote (`gs://`): there both
  logs grow by append-only parts (appendlog.AppendLog; TensorBoard reads every event file of a
  folder, so its parts are whole event files) instead of being rewritten at each log step.

  TensorBoard tags are `namespace/name` (the stage: fine-tuning's `loss` is not pretraining's,
  and one card would overlay them); counts (`is_count`) go to its Text tab when they change,
  not to curves. metrics.jsonl keeps the plain names.
  """

  def __init__(self, workdir, enabled: bool = True, flush_s: float = 30.0, namespace: str = ""):
    from etils import epath
    self.enabled = enabled
    self.namespace = namespace
    self._counts_written = {}
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self._log = appendlog.AppendLog(self.path, flush_s)
    self._tb, self._tb_opened = None, False
    self._background = None
    if enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._background = appendlog.Background(str(self.path))

  def truncate_after(self, step: int) -> None:
    """Drops rows and TensorBoard events past `step`: a run resumed from a checkpoint logs them
    again (identically), and a curve must not get two points per step. (It also folds a remote
    log's parts, a killed run's included, into one file.)"""
    if not self.enabled:
      return
    keep = [line + "\n" for line in appendlog.read_lines(self.path)
            if json.loads(line)["step"] <= step]
    if keep or self.path.exists():
      appendlog.rewrite(self.path, "".join(keep))  # never seen empty
    _truncate_events(self.path.parent / "tensorboard", step)

  def _events(self):
    """TensorBoard's writer, opened at the first write (after `truncate_after`, so the file it
    starts is never one that is cut back); None where it cannot write."""
    if self.enabled and not self._tb_opened:
      self._tb_opened = True
      logdir = str(self.path.parent / "tensorboard")
      self._tb = (_EventParts(logdir, self._log.flush_s) if appendlog.is_remote(logdir)
                  else _event_writer(logdir))
    return self._tb

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: (None if v is None else float(v)) for k, v in scalars.items()}}
    self._background.submit(self._write_row, row, time.time())

  def _write_row(self, row: dict, wall_time: float) -> None:
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    self._log.append(json.dumps(row) + "\n")
    if self._events() is None:
      return
    values = [Summary.Value(tag=self.tag(k), simple_value=v) for k, v in row.items()
              if k != "step" and v is not None and not is_count(k)]
    for k, v in row.items():
      if is_count(k) and v is not None and self._counts_written.get(k) != v:
        self._counts_written[k] = v
        values.append(_text_value(self.tag(k), f"{v:g}"))
    self._tb.add_event(Event(wall_time=wall_time, step=row["step"],
                             summary=Summary(value=values)))

  def tag(self, name: str) -> str:
    """`name`'s TensorBoard tag: under the writer's namespace unless it names its own."""
    return f"{self.namespace}/{name}" if self.namespace and "/" not in name else name

  def write_image(self, step: int, tag: str, image) -> None:
    """A uint8 [H, W, C] image (a sample grid, a plot) into TensorBoard's Images tab."""
    if self.enabled:
      self._background.submit(self._write_image, int(step), tag, np.asarray(image, np.uint8),
                              time.time())

  def _write_image(self, step: int, tag: str, image: np.ndarray, wall_time: float) -> None:
    if self._events() is None:
      return
    import io

    from PIL import Image
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    png = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(png, format="PNG")
    value = Summary.Value(tag=self.tag(tag), image=Summary.Image(
        height=image.shape[0], width=image.shape[1], colorspace=image.shape[-1],
        encoded_image_string=png.getvalue()))
    self._tb.add_event(Event(wall_time=wall_time, step=step, summary=Summary(value=[value])))
    self._tb.flush()

  def flush(self) -> None:
    """Remote: what was written so far goes to storage now (the loop calls it at each
    checkpoint, so a killed run keeps every row up to the step it resumes from)."""
    if self._background is not None:
      self._background.submit(self._flush_logs)

  def _flush_logs(self) -> None:
    self._log.flush()
    if self._tb is not None:
      self._tb.flush()

  def wait(self) -> None:
    """Until every row and image written so far is on storage (local: appended)."""
    if self._background is not None:
      self._background.wait()

  def close(self) -> None:
    if self._background is None:
      return
    self._background.submit(self._close_logs)
    self._background.close()

  def _close_logs(self) -> None:
    self._log.close()
    if self._tb is not None:
      self._tb.close()


def is_count(name: str) -> bool:
  """A column that counts things (examples evaluated, a host's index): text, not a curve."""
  return name.endswith("_examples") or name == "slowest_host"


def _text_value(tag: str, text: str):
  """A Summary value for TensorBoard's Text tab."""
  from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
  meta = summary_pb2.SummaryMetadata(
      plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
  return summary_pb2.Summary.Value(tag=tag, metadata=meta, tensor=tensor_pb2.TensorProto(
      dtype=types_pb2.DT_STRING, string_val=[text.encode()],
      tensor_shape=tensor_shape_pb2.TensorShapeProto()))


def read_rows(directory) -> list[dict]:
  """The rows of `directory`/metrics.jsonl ([] when there is none), remote parts included."""
  from etils import epath
  return [json.loads(line) for line in appendlog.read_lines(epath.Path(directory) / "metrics.jsonl")]


class _EventParts:
  """TensorBoard events on an object store: each flush writes the events since the last one as
  a new, whole event file (TensorBoard reads a folder's event files in name order)."""

  def __init__(self, logdir: str, flush_s: float):
    self.logdir, self.flush_s = logdir, flush_s
    self._events: list[bytes] = []
    self._flushed_at = time.monotonic()

  def add_event(self, event) -> None:
    self._events.append(event.SerializeToString())
    if time.monotonic() - self._flushed_at >= self.flush_s:
      self.flush()

  def flush(self) -> None:
    if self._events:
      from etils import epath
      from tensorboard.compat.proto.event_pb2 import Event
      header = Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString()
      folder = epath.Path(self.logdir)
      folder.mkdir(parents=True, exist_ok=True)
      (folder / f"events.out.tfevents.{time.time_ns():020d}.igpt_jax").write_bytes(
          _event_file_bytes([header, *self._events]))
      self._events = []
    self._flushed_at = time.monotonic()

  def close(self) -> None:
    self.flush()


def _truncate_events(logdir, step: int) -> None:
  """Rewrites every TensorBoard event file in `logdir` without the events past `step`, each
  file whole or not at all."""
  from etils import epath
  from tensorboard.backend.event_processing import event_file_loader
  logdir = epath.Path(logdir)
  if not logdir.exists():
    return
  for path in sorted(logdir.glob("*tfevents*")):
    events = list(event_file_loader.EventFileLoader(str(path)).Load())
    if all(e.step <= step for e in events):
      continue
    workdir_lib.write_atomic(path, _event_file_bytes(
        [e.SerializeToString() for e in events if e.step <= step]))


def _event_file_bytes(records: list[bytes]) -> bytes:
  """Serialised events as one TensorBoard event file (TFRecord framing)."""
  import io

  from tensorboard.summary.writer.record_writer import RecordWriter
  buffer = io.BytesIO()
  writer = RecordWriter(buffer)
  for record in records:
    writer.write(record)
  return buffer.getvalue()


def _event_writer(logdir: str):
  """TensorBoard's event writer, or None (with a warning) where it cannot write: without
  TensorFlow it reaches object stores through fsspec, so gs:// needs the gcsfs package."""
  from tensorboard.summary.writer.event_file_writer import EventFileWriter
  try:
    return EventFileWriter(logdir)
  except Exception as e:  # noqa: BLE001 - metrics.jsonl is still written
    print(f"warning: no TensorBoard events in {logdir} ({type(e).__name__}: {e}); "
          "metrics.jsonl has every logged value. For gs:// install gcsfs.", flush=True)
    return None


def scalars_text(scalars: dict) -> str:
  """'k=v ...' for a log line: counts (ints) whole, everything else to 4 significant digits;
  None values left out."""
  return " ".join(f"{k}={v}" if isinstance(v, int) else f"{k}={v:.4g}"
                  for k, v in scalars.items() if v is not None)


class Progress:
  """A tqdm bar on a terminal, plain log lines otherwise (CI logs, files); silent with
  log=None (processes other than 0)."""

  def __init__(self, total: int, initial: int, log=print):
    self.log, self.total = log, total
    self.bar = None
    if log is not None and sys.stdout.isatty():
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
    self.last = initial

  def update(self, step: int, scalars: dict) -> None:
    text = scalars_text(scalars)
    if self.bar is not None:
      self.bar.update(step - self.last)
      self.bar.set_postfix_str(text)
    elif self.log is not None:
      self.log(f"step {step}/{self.total} {text}")
    self.last = step

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
