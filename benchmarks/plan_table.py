"""The smallest TPU v5e / H100 mesh on which each paper-size model trains at batch 128.

For each config and device count 1, 2, 4, ... 256 (simulated CPU devices), runs the `plan`
stage: compiles the real train step on a ZeRO-3 mesh (fsdp = all devices; past 128 devices,
tensor=2 so the batch of 128 still splits evenly) with bfloat16 compute and full remat, and reads
per-device bytes from XLA's memory analysis. Prints a markdown table and, last, one JSON line.
CPU-compiled memory is an estimate of what TPU/GPU compilers will use.

  .venv/bin/python benchmarks/plan_table.py [--configs igpt_s igpt_m] [--max_devices 256]
"""
import argparse
import json
import os
import subprocess
import sys

HBM_GIB = {"TPU v5e (16 GiB)": 16, "H100 (80 GiB)": 80}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def plan(config: str, devices: int) -> dict:
  fsdp, tensor = (devices, 1) if devices <= 128 else (devices // 2, 2)
  cmd = [sys.executable, "-m", "igpt_jax.main", f"--config={REPO}/configs/{config}.py",
         "--config.stage=plan", f"--config.plan.num_devices={devices}", "--config.mesh.data=1",
         f"--config.mesh.fsdp={fsdp}", f"--config.mesh.tensor={tensor}",
         "--config.model.dtype=bfloat16", "--config.model.remat=full",
         "--config.train.batch_size=128", "--workdir=/tmp/igpt_plan_table"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                        env={**os.environ, "XLA_FLAGS": ""})
  if proc.returncode:
    return {"error": proc.stderr.strip().splitlines()[-1][:200]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", nargs="+", default=["igpt_s", "igpt_m", "igpt_l", "igpt_xl"])
  parser.add_argument("--max_devices", type=int, default=256)
  args = parser.parse_args()
  rows = {}
  for config in args.configs:
    smallest, n = {}, 1
    while n <= args.max_devices and len(smallest) < len(HBM_GIB):
      out = plan(config, n)
      gib = out.get("per_device_bytes", float("inf")) / 2**30
      print(f"{config} on {n} devices: {gib:.1f} GiB per device {out.get('error', '')}", flush=True)
      for chip, hbm in HBM_GIB.items():
        if chip not in smallest and gib <= hbm:
          smallest[chip] = {"devices": n, "gib_per_device": round(gib, 1), "mesh": out["mesh"]}
      n *= 2
    rows[config] = smallest
  print("\n| config | " + " | ".join(HBM_GIB) + " |\n|---|" + "---|" * len(HBM_GIB))
  for config, smallest in rows.items():
    cells = [f"{s['devices']} ({s['gib_per_device']} GiB/device)" if (s := smallest.get(chip))
             else f"> {args.max_devices}" for chip in HBM_GIB]
    print(f"| {config} | " + " | ".join(cells) + " |")
  print(json.dumps({"benchmark": "plan_table", "batch_size": 128, "rows": rows}))


if __name__ == "__main__":
  main()
