#!/usr/bin/env bash
# Pretrain igpt_jax on a Cloud TPU VM pod slice: create the slice, copy this checkout to every
# worker and install it, run the same command on all workers (JAX finds its peers itself), copy the logs back.
#
#   launch/tpu_pod.sh --name igpt-l --zone us-central2-b --type v5litepod-64 \
#       --config configs/igpt_l.py --workdir gs://BUCKET/runs/igpt_l [--dry-run] [-- --config.train.steps=1000]
#
# --dry-run prints every gcloud command instead of running it. Extra arguments after -- go to
# igpt_jax.main. Requires gcloud with a project and TPU quota; --workdir should be a gs:// path
# so every worker writes checkpoints to the same place.
set -euo pipefail

NAME="" ZONE="" TYPE="" CONFIG="" WORKDIR="" DRY_RUN=0
VERSION="v2-alpha-tpuv5-lite"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
TARBALL="${TMPDIR:-/tmp}/igpt_jax-src.tar.gz"
EXTRA=()

usage() { sed -n '2,13p' "$0"; exit "${1:-0}"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --type) TYPE="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "unknown argument: $1" >&2; usage 2 ;;
  esac
done
for required in NAME ZONE TYPE CONFIG WORKDIR; do
  if [[ -z "${!required}" ]]; then
    echo "missing --$(echo "$required" | tr '[:upper:]' '[:lower:]')" >&2
    usage 2
  fi
done

run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"; printf '\n'
  else
    "$@"
  fi
}

on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$1"
}

run gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" --accelerator-type="$TYPE" \
  --version="$VERSION"
# Ship this checkout (committed files) to every worker and install it there.
run git -C "$HERE" archive --format=tar.gz --prefix=igpt_jax/ -o "$TARBALL" HEAD
run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:igpt_jax-src.tar.gz" --zone="$ZONE" --worker=all
on_all_workers "rm -rf igpt_jax && tar xzf igpt_jax-src.tar.gz && \
python3 -m pip install -q -e ./igpt_jax 'jax[tpu]'"
TRAIN="cd igpt_jax && python3 -m igpt_jax.main --config=$CONFIG --workdir=$WORKDIR"
for arg in "${EXTRA[@]+"${EXTRA[@]}"}"; do TRAIN+=" $(printf '%q' "$arg")"; done
on_all_workers "$TRAIN 2>&1 | tee train.log"
run gcloud compute tpus tpu-vm scp "$NAME:igpt_jax/train.log" "./$NAME-train.log" \
  --zone="$ZONE" --worker=0
