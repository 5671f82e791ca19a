"""TensorFlow, imported without its native start-up lines on stderr.

TensorFlow's C++ logging prints INFO lines at import and again when its runtime starts (oneDNN,
CPU features), before anything can configure it and whatever TF_CPP_MIN_LOG_LEVEL says; the
CLI's stderr is for the one `error:` line a user needs. TensorFlow only reads and transforms
pixels here (tf.data, TFDS, the OpenAI checkpoint reader), so oneDNN's kernels (the runtime's
line) are left off unless TF_ENABLE_ONEDNN_OPTS says otherwise.
"""
import contextlib
import os
import sys


def tensorflow():
  """The `tensorflow` module; the first import runs with file descriptor 2 pointed at /dev/null
  (an ImportError still reaches the caller)."""
  if sys.modules.get("tensorflow") is None:  # not imported yet, or blocked (an ImportError)
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with _native_stderr_silenced():
      import tensorflow  # noqa: F401
  return sys.modules["tensorflow"]


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
