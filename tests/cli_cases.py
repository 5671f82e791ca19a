"""Runs many command lines of `python -m igpt_jax.main` from one process: imports once, then
forks a child per case (before any JAX backend starts, so the fork is clean), each child a
fresh command line with its own absl flags. Reads a JSON list of argument lists on stdin,
writes a JSON list of {"returncode", "stdout", "stderr"}. Used by tests/test_cli.py: ~25 user
mistakes in the time of two or three process starts."""
import json
import os
import sys
import tempfile

from igpt_jax import main as main_lib  # noqa: F401  (imported once, inherited by each child)


def run_case(args: list[str]) -> dict:
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    pid = os.fork()
    if pid == 0:  # the child: stdout/stderr to the files, then the command line
      os.dup2(out.fileno(), 1)
      os.dup2(err.fileno(), 2)
      sys.stdout = os.fdopen(1, "w", buffering=1)
      sys.stderr = os.fdopen(2, "w", buffering=1)
      sys.argv = ["igpt_jax.main", *args]
      status = 0
      try:
        main_lib.cli(args)
      except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
      except BaseException:  # noqa: BLE001 - a traceback is what the test looks for
        import traceback
        traceback.print_exc()
        status = 1
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(status)
    _, wait_status = os.waitpid(pid, 0)
    out.seek(0)
    err.seek(0)
    return {"returncode": os.waitstatus_to_exitcode(wait_status),
            "stdout": out.read().decode(errors="replace"),
            "stderr": err.read().decode(errors="replace")}


if __name__ == "__main__":
  print(json.dumps([run_case(args) for args in json.load(sys.stdin)]))
