"""Append-only run logs (metrics.jsonl, goodput events, TensorBoard events), written off the
training loop's thread, on local disks and object stores alike.

Why: process 0 writing on its main thread stalls every other host at the next collective, and
an object store (`gs://`) cannot append: rewriting the whole file at each log step costs O(N^2)
bytes over a run. Here a local file is appended to; a remote one gets a new part object
(`<name>.parts/<time_ns>`) for what was written since the last flush, every `flush_s` seconds
and at close, and `compact()` (at a run's start, and at close) folds the parts back into the one
file. Readers (`read_lines`) see the file followed by its parts, so nothing is missed after a
killed process, and the bytes written grow linearly with the run.
"""

from __future__ import annotations

import queue
import sys
import threading
import time

from etils import epath

from igpt_jax import workdir as workdir_lib


def is_remote(path) -> bool:
  return "://" in str(path)


def _parts_dir(path: epath.Path) -> epath.Path:
  return path.parent / f"{path.name}.parts"


def _parts(path: epath.Path) -> list[epath.Path]:
  folder = _parts_dir(path)
  return sorted(folder.iterdir(), key=lambda p: p.name) if folder.exists() else []


def read_text(path) -> str:
  """The whole log: the file, then the parts not yet folded into it."""
  path = epath.Path(path)
  text = path.read_text() if path.exists() else ""
  return text + "".join(part.read_text() for part in _parts(path))


def read_lines(path) -> list[str]:
  return [line for line in read_text(path).splitlines() if line.strip()]


def rewrite(path, text: str) -> None:
  """Replaces the log with `text` (atomically), then drops its parts."""
  path = epath.Path(path)
  workdir_lib.write_atomic(path, text.encode("utf-8"))
  for part in _parts(path):
    part.unlink()


def compact(path) -> None:
  """Folds a remote log's parts into its file (a no-op for local logs: they have none)."""
  path = epath.Path(path)
  if _parts(path):
    rewrite(path, read_text(path))


class Background:
  """One writer thread for a log's writes, in order. `close()` finishes what was queued. A
  write that fails is reported once on stderr and the run goes on: logs are not the state."""

  def __init__(self, name: str):
    self.name = name
    self._queue: queue.Queue = queue.Queue()
    self._failed = False
    self._thread = threading.Thread(target=self._work, daemon=True, name=f"writer-{name}")
    self._thread.start()

  def submit(self, fn, *args) -> None:
    self._queue.put((fn, args))

  def _work(self) -> None:
    while True:
      fn, args = self._queue.get()
      try:
        if fn is None:
          return
        fn(*args)
      except Exception as e:  # noqa: BLE001 - reported; training goes on
        if not self._failed:
          self._failed = True
          print(f"warning: writing {self.name} failed ({type(e).__name__}: {e}); later writes "
                "are still tried.", file=sys.stderr, flush=True)
      finally:
        self._queue.task_done()

  def wait(self) -> None:
    """Until everything submitted so far is written."""
    self._queue.join()

  def close(self) -> None:
    if self._thread.is_alive():
      self._queue.put((None, ()))
      self._thread.join()


class AppendLog:
  """A text log appended to line by line; see the module doc for remote paths. Call from the
  writer thread (or any single thread)."""

  def __init__(self, path, flush_s: float = 30.0):
    self.path = epath.Path(path)
    self.remote, self.flush_s = is_remote(self.path), flush_s
    self._pending: list[str] = []
    self._flushed_at = time.monotonic()

  def append(self, text: str) -> None:
    if not self.remote:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(text)
      return
    self._pending.append(text)
    if time.monotonic() - self._flushed_at >= self.flush_s:
      self.flush()

  def flush(self) -> None:
    """Remote: what was appended since the last flush, as one new part."""
    if self._pending:
      folder = _parts_dir(self.path)
      folder.mkdir(parents=True, exist_ok=True)
      (folder / f"{time.time_ns():020d}").write_text("".join(self._pending))
      self._pending = []
    self._flushed_at = time.monotonic()

  def close(self) -> None:
    if self.remote:
      self.flush()
      compact(self.path)
