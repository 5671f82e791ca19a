"""The plan table: each paper-size config, as shipped, compiled for TPU slices by libtpu's own
compiler (no TPU needed) -- the attention that runs there, per-chip memory, whether it fits, the
roofline step time and MFU from the compiler's FLOPs (plus the splash kernels', which its cost
analysis cannot see) and HBM bytes, and compile time -- plus GPU rows from XLA's CUDA
compiler without a GPU where jax's CUDA plugin is installed (`.[gpu-plan]`), else from XLA's
CPU compiler (labelled `cpu-estimate`).

  .venv/bin/python benchmarks/plan_table.py [--configs igpt_s igpt_l] [--targets v5litepod-64 ...]

Without --targets each config is planned on its reference slice (named in its docstring) and on
the next smaller slice of the same kind. Prints a markdown table and, last, one JSON line.
"""
import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = {"igpt_s": ["v5litepod-16", "v5litepod-8", "h100"],
           "igpt_m": ["v5litepod-32", "v5litepod-16", "h100"],
           "igpt_l": ["v5litepod-64", "v5litepod-32", "h100-8"],
           "igpt_xl": ["v5p-256", "v5p-128"]}


def plan(config: str, target: str) -> dict:
  cmd = [sys.executable, "-m", "igpt_jax.main", f"--config={REPO}/configs/{config}.py",
         "--config.stage=plan", f"--config.plan.target={target}", "--config.plan.search=false",
         "--workdir=/tmp/igpt_plan_table"]
  began = time.time()
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                        env={**os.environ, "XLA_FLAGS": ""})
  if proc.returncode:
    return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  out["wall_s"] = round(time.time() - began, 1)
  return out


def row(config: str, target: str, out: dict) -> str:
  if "error" in out:
    return f"| {config} | {target} | error: {out['error']} |"
  usable = out.get("usable_gib", out["hbm_gib"])  # the compiler's limit
  gib = (f"{out['per_device_gib']:.2f} of {usable:g}" if "per_device_gib" in out
         else f"out of memory ({usable:g})")
  mfu = f"{100 * out['mfu_roofline']:.0f}% ({out['bound']})" if "mfu_roofline" in out else "-"
  step = f"{out['step_s_roofline']:.3f}" if "step_s_roofline" in out else "-"
  mesh = out.get("mesh") or {}
  mesh_text = ("x".join(f"{k}{v}" for k, v in mesh.items() if v > 1) or "1") if mesh else "-"
  attention = (out.get("attention") or "-").split(" ")[0]
  return (f"| {config} | {target} ({out['compiler']}) | {out['chips']} / {out['hosts']} | "
          f"{mesh_text} | {attention} | {gib} | {'yes' if out['fits'] else 'no'} | "
          f"{step} | {mfu} | {out['compile_s']} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", nargs="+", default=list(TARGETS))
  parser.add_argument("--targets", nargs="+", default=None)
  args = parser.parse_args()
  results = {}
  lines = ["| config | target (compiler) | chips / hosts | mesh | attention | GiB per chip | "
           "fits | roofline s/step | roofline MFU | compile s |", "|---" * 10 + "|"]
  for config in args.configs:
    for target in args.targets or TARGETS[config]:
      out = plan(config, target)
      results[f"{config}@{target}"] = out
      lines.append(row(config, target, out))
      print(lines[-1], flush=True)
  print("\n" + "\n".join(lines))
  print(json.dumps({"benchmark": "plan_table", "rows": results}))


if __name__ == "__main__":
  main()
