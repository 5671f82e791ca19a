"""TensorFlow, imported without its native start-up lines on stderr and without the GPUs.

TensorFlow's C++ logging prints INFO lines at import and again when its runtime starts (oneDNN,
CPU features), before anything can configure it and whatever TF_CPP_MIN_LOG_LEVEL says; the
CLI's stderr is for the one `error:` line a user needs. TensorFlow only reads and transforms
pixels here (tf.data, TFDS, the OpenAI checkpoint reader), so oneDNN's kernels (the runtime's
line) are left off unless TF_ENABLE_ONEDNN_OPTS says otherwise.
"""
import contextlib
import os
import sys


_gpus_hidden = False


def tensorflow():
  """The `tensorflow` module, with every GPU hidden from it; the first import runs with file
  descriptor 2 pointed at /dev/null (an ImportError still reaches the caller).

  TensorFlow only feeds JAX here: a GPU build (Colab, NGC images) would otherwise reserve most
  of each GPU's memory for itself as soon as its runtime starts, memory JAX needs."""
  global _gpus_hidden
  if sys.modules.get("tensorflow") is None:  # not imported yet, or blocked (an ImportError)
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with _native_stderr_silenced():
      import tensorflow  # noqa: F401
  tf = sys.modules["tensorflow"]
  if not _gpus_hidden:
    try:
      tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # its runtime started before us (the caller imported it): too late
      pass
    _gpus_hidden = True
  return tf


@contextlib.contextmanager
def _native_stderr_silenced():
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)
