#!/usr/bin/env bash
# Run an igpt_jax stage on a SLURM cluster, one process per GPU, restarting itself after a
# preemption until the stage is done:
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/gpu_slurm.sh configs/igpt_l.py /shared/runs/igpt_l \
#       [--config.stage=pretrain --config.train.steps=1000 ...]
#
# - One task per GPU (--ntasks-per-node = GPUs per node), and every task sees all of its node's
#   GPUs: JAX's SLURM detection gives task i of a node the GPU SLURM_LOCALID. (A per-task
#   binding, --gpus-per-task=1, shows each task only "GPU 0" and every task above 0 of a node
#   fails with "invalid device ordinal".)
# - Environment: the virtualenv in $IGPT_VENV, else <repo>/.venv if there is one, is activated.
# - Preemption and time limit: SLURM sends SIGTERM to this script 120 s before the limit
#   (--signal=B:TERM@120) and on `scancel --signal=TERM`; it passes it on to the tasks, which
#   save a checkpoint and exit 75; the script then requeues the job (scontrol requeue), which
#   resumes from that checkpoint. Any other failure ends the job with that status.
# - Logs: one file per job (appended across requeues), every line labelled with its task rank.
# The workdir must be on a file system every node sees (or gs://).
#SBATCH --job-name=igpt_jax
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:TERM@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=igpt_jax-%j.log
set -euo pipefail

usage="usage: sbatch [--nodes=N --gpus-per-node=G] launch/gpu_slurm.sh CONFIG WORKDIR [overrides...]"
CONFIG="${1:?$usage}"
WORKDIR="${2:?$usage}"
shift 2

# Under sbatch this script runs from a copy in SLURM's spool: find the repository from the
# submit directory.
REPO="${IGPT_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}"
VENV="${IGPT_VENV:-$REPO/.venv}"
if [[ -f "$VENV/bin/activate" ]]; then
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
fi
PYTHON="${PYTHON:-python3}"
cd "$REPO"

# Latency-hiding scheduler and async collectives overlap communication with compute.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"

echo "[gpu_slurm] job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}: $CONFIG -> $WORKDIR"
srun --label --kill-on-bad-exit=1 "$PYTHON" -m igpt_jax.main --config="$CONFIG" \
  --workdir="$WORKDIR" "$@" &
srun_pid=$!
# SIGTERM to this script (the time limit, a preemption): the tasks save and exit 75.
trap 'echo "[gpu_slurm] SIGTERM: asking the tasks to save"; kill -TERM "$srun_pid" 2>/dev/null || true' TERM

status=0
# `wait` returns early (status > 128) when the trap runs; srun is then still there (alive, or a
# zombie until reaped), so wait again for its own status.
while kill -0 "$srun_pid" 2>/dev/null; do
  wait "$srun_pid" && status=0 || status=$?
done

if [[ "$status" -eq 75 ]]; then
  echo "[gpu_slurm] saved after a preemption; requeueing job ${SLURM_JOB_ID} to resume"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
echo "[gpu_slurm] finished with status $status"
exit "$status"
