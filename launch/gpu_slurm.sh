#!/usr/bin/env bash
# Pretrain igpt_jax on a SLURM GPU cluster, one process per GPU:
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/gpu_slurm.sh configs/igpt_l.py /shared/runs/igpt_l \
#       [--config.train.steps=1000 ...]
#
# srun starts one task per GPU; each task sees one GPU. jax.distributed.initialize() reads the
# coordinator (the first node), process count and process id from SLURM's variables. The
# workdir must be on a file system every node sees.
#SBATCH --job-name=igpt_jax
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --output=igpt_jax-%j.log
set -euo pipefail

CONFIG="${1:?usage: sbatch launch/gpu_slurm.sh CONFIG WORKDIR [overrides...]}"
WORKDIR="${2:?usage: sbatch launch/gpu_slurm.sh CONFIG WORKDIR [overrides...]}"
shift 2

# Latency-hiding scheduler and async collectives overlap communication with compute.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
PYTHON="${PYTHON:-python3}"

srun --kill-on-bad-exit=1 "$PYTHON" -m igpt_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
