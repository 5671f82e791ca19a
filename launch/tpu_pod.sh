#!/usr/bin/env bash
# igpt_jax on a Cloud TPU VM pod slice, as a tool you leave running:
#
#   launch/tpu_pod.sh create --name igpt-l --zone us-central2-b --type v5litepod-64 [--spot|--queued]
#   launch/tpu_pod.sh run    --name igpt-l --zone us-central2-b --config configs/igpt_l.py \
#                            --workdir gs://BUCKET/runs/igpt_l [--supervise] [-- --config.X=Y ...]
#   launch/tpu_pod.sh status --name igpt-l --zone us-central2-b
#   launch/tpu_pod.sh logs   --name igpt-l --zone us-central2-b [--worker I] [--lines N]
#   launch/tpu_pod.sh stop   --name igpt-l --zone us-central2-b    (SIGTERM: save, exit 75)
#   launch/tpu_pod.sh delete --name igpt-l --zone us-central2-b
#
# create reuses a slice that is there (a preempted one is deleted and made again); --spot asks
# for spot capacity, --queued goes through a queued resource; --version defaults to the
# software version of the TPU type. Every worker gets this checkout (committed files), Python
# 3.11 and a venv with the jax[tpu] the project is tested with. run starts the job detached on
# every worker (setsid nohup: it outlives this shell and the ssh session), each writing
# ~/igpt_run/train.log and its exit status. run --supervise stays and watches: when the job
# exits 75 (saved after a preemption) or the slice was preempted and has been made again, it
# starts the job again, which resumes from the checkpoint, until it exits 0 (it remakes the
# slice as `describe` said it was when supervision began: type, version, spot, queued, so
# `run` needs none of create's flags); on any other
# failure it prints every worker's log tail and exits 1. Run the supervisor itself under
# tmux/nohup on a machine that stays up. --dry-run prints the gcloud commands instead.
# The workdir must be a gs:// path (every worker writes checkpoints to the same place).
# libtpu flags: igpt_jax.main sets LIBTPU_INIT_ARGS to its collective-overlap flags (the ones
# MaxText's TPU configs use; igpt_jax/targets.py names them), and `plan` compiles with the same;
# a LIBTPU_INIT_ARGS set where you call `run` replaces them on every worker.
set -euo pipefail

COMMAND="${1:-}"
case "$COMMAND" in
  create|run|status|logs|stop|delete) shift ;;
  -h|--help|"") sed -n '2,25p' "$0"; exit 0 ;;
  *) echo "error: unknown command $COMMAND (create, run, status, logs, stop, delete)" >&2; exit 2 ;;
esac

NAME="" ZONE="" TYPE="" VERSION="" CONFIG="" WORKDIR="" WORKER="" LINES=50
SPOT=0 QUEUED=0 SUPERVISE=0 DRY_RUN=0 POLL="${IGPT_POLL_SECONDS:-60}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --type) TYPE="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --worker) WORKER="$2"; shift 2 ;;
    --lines) LINES="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --queued) QUEUED=1; shift ;;
    --supervise) SUPERVISE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "error: unknown argument $1 for $COMMAND" >&2; exit 2 ;;
  esac
done
need() {
  for field in "$@"; do
    if [[ -z "${!field}" ]]; then
      echo "error: $COMMAND needs --$(echo "$field" | tr '[:upper:]' '[:lower:]')" >&2
      exit 2
    fi
  done
}
need NAME ZONE

say() { echo "[tpu_pod] $*" >&2; }

run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"; printf '\n'
  else
    "$@"
  fi
}

# The TPU software version each type's VMs boot.
default_version() {
  case "$1" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) echo "error: no default --version for --type $1; give --version" >&2; exit 2 ;;
  esac
}

# READY, CREATING, PREEMPTED, ... or NOT_FOUND.
slice_state() {
  gcloud compute tpus tpu-vm describe "$NAME" --zone="$ZONE" --format='value(state)' \
    2>/dev/null || echo NOT_FOUND
}

on_workers() {  # on_workers all|I COMMAND
  run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker="$1" --command="$2"
}

create_slice() {
  need TYPE
  local version state spot=()
  version="${VERSION:-$(default_version "$TYPE")}" || exit 2
  [[ "$SPOT" == 1 ]] && spot=(--spot)
  if [[ "$DRY_RUN" == 1 ]]; then state=NOT_FOUND; else state="$(slice_state)"; fi
  case "$state" in
    READY|CREATING|STARTING|RESTARTING|REPAIRING)
      say "slice $NAME is there ($state): reusing it" ;;
    *)
      if [[ "$state" != NOT_FOUND ]]; then
        say "slice $NAME is $state: deleting it to make it again"
        delete_slice
      fi
      if [[ "$QUEUED" == 1 ]]; then
        run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" --zone="$ZONE" \
          --accelerator-type="$TYPE" --runtime-version="$version" "${spot[@]+"${spot[@]}"}"
      else
        run gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" --accelerator-type="$TYPE" \
          --version="$version" "${spot[@]+"${spot[@]}"}"
      fi ;;
  esac
  if [[ "$DRY_RUN" != 1 ]]; then
    until [[ "$(slice_state)" == READY ]]; do
      say "waiting for $NAME to be READY ($(slice_state))"
      sleep "$POLL"
    done
  fi
  install_on_workers
}

# This checkout, Python 3.11 and a venv with the pinned jax[tpu] (setup.py's `tpu` extra).
install_on_workers() {
  local tarball
  tarball="${TMPDIR:-/tmp}/igpt_jax-src-$NAME.tar.gz"
  run git -C "$HERE" archive --format=tar.gz --prefix=igpt_jax/ -o "$tarball" HEAD
  run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:igpt_jax-src.tar.gz" --zone="$ZONE" \
    --worker=all
  on_workers all "set -e; rm -rf ~/igpt_jax && tar xzf ~/igpt_jax-src.tar.gz -C ~ && \
command -v python3.11 >/dev/null || (sudo apt-get update -q && sudo apt-get install -y -q \
python3.11 python3.11-venv) && ( test -x ~/igpt_venv/bin/python || python3.11 -m venv ~/igpt_venv ) \
&& ~/igpt_venv/bin/pip install -q -e ~/igpt_jax[tpu] && echo installed on \$(hostname)"
}

delete_slice() {
  if [[ "$QUEUED" == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$NAME" --zone="$ZONE" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" --zone="$ZONE" --quiet
  fi
}

# The job on every worker, detached: it outlives the ssh session and this shell.
start_job() {
  need CONFIG WORKDIR
  local args
  args="$(printf '%q ' --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA[@]+"${EXTRA[@]}"}")"
  local flags=""
  if [[ -n "${LIBTPU_INIT_ARGS+set}" ]]; then flags="LIBTPU_INIT_ARGS=$(printf '%q' "$LIBTPU_INIT_ARGS") "; fi
  on_workers all "mkdir -p ~/igpt_run && rm -f ~/igpt_run/exit_code && cd ~/igpt_jax && \
echo \"[tpu_pod] start \$(date -u +%FT%TZ)\" >> ~/igpt_run/train.log && \
{ setsid nohup bash -c '$flags~/igpt_venv/bin/python -m igpt_jax.main $args >> ~/igpt_run/train.log 2>&1; \
echo \$? > ~/igpt_run/exit_code' > /dev/null 2>&1 < /dev/null & } && echo started on \$(hostname)"
}

# One line per worker: "igpt-status <host> running|<exit status>".
worker_statuses() {
  on_workers all "echo igpt-status \$(hostname) \$(cat ~/igpt_run/exit_code 2>/dev/null || \
(pgrep -f igpt_jax.main >/dev/null && echo running) || echo none)" 2>/dev/null \
    | grep '^igpt-status ' || true
}

print_logs() {  # print_logs all|I
  on_workers "$1" "echo \"==== \$(hostname): last $LINES lines of ~/igpt_run/train.log\"; \
tail -n $LINES ~/igpt_run/train.log 2>/dev/null || echo '(no log)'"
}

# What `create` needs to remake the slice as it is: read from gcloud while it exists (a
# preempted slice is deleted and made again, so it cannot be asked then). Flags given to `run`
# are kept; spot and queued also come from the slice itself.
remember_slice() {
  local fields type version spot queued
  if ! fields="$(gcloud compute tpus tpu-vm describe "$NAME" --zone="$ZONE" \
      --format='value(acceleratorType,runtimeVersion,schedulingConfig.spot,queuedResource)' \
      2>/dev/null)"; then
    [[ -n "$TYPE" ]] && return 0
    echo "error: run --supervise: slice $NAME in $ZONE was not found, so it could not be made" \
      "again after a preemption; create it first (or give --type to run)" >&2
    exit 2
  fi
  IFS=$'\t' read -r type version spot queued <<<"$fields" || true
  TYPE="${TYPE:-$type}"
  VERSION="${VERSION:-$version}"
  [[ "${spot,,}" == true ]] && SPOT=1
  [[ -n "$queued" ]] && QUEUED=1
  if [[ -z "$TYPE" ]]; then
    echo "error: run --supervise: gcloud does not report the accelerator type of $NAME; give" \
      "--type to run" >&2
    exit 2
  fi
  local how="$TYPE"
  [[ "$SPOT" == 1 ]] && how+=", spot"
  [[ "$QUEUED" == 1 ]] && how+=", queued"
  say "supervising $NAME ($how): a preempted slice is made again like this"
}

supervise() {
  local restarts=0 lost=0 state statuses codes
  while true; do
    sleep "$POLL"
    state="$(slice_state)"
    if [[ "$state" != READY ]]; then
      say "slice $NAME is $state (preempted?): making it again, then resuming"
      create_slice
      start_job
      restarts=$((restarts + 1))
      continue
    fi
    statuses="$(worker_statuses)"
    codes="$(awk '{print $3}' <<<"$statuses" | sort -u | tr '\n' ' ')"
    say "workers: ${codes:-no answer}"
    if grep -qw none <<<"$codes"; then  # no job and no exit status: it vanished
      lost=$((lost + 1))
      if [[ "$lost" -lt 3 ]]; then continue; fi
      codes="lost"
    elif [[ -z "$statuses" ]] || grep -qw running <<<"$codes"; then
      lost=0
      continue
    fi
    if [[ "$codes" == "0 " ]]; then
      say "done: every worker exited 0 ($restarts restarts)"
      return 0
    fi
    if ! tr ' ' '\n' <<<"$codes" | grep -qvx -e 0 -e 75 -e ''; then
      say "the job saved after a preemption (exit 75): starting it again to resume"
      start_job
      restarts=$((restarts + 1))
      continue
    fi
    say "the job failed (exit statuses: $codes); every worker's log tail follows"
    on_workers all "pkill -TERM -f igpt_jax.main || true" >/dev/null 2>&1 || true
    print_logs all
    return 1
  done
}

case "$COMMAND" in
  create) create_slice ;;
  run)
    need CONFIG WORKDIR
    if [[ "$SUPERVISE" == 1 && "$DRY_RUN" != 1 ]]; then remember_slice; fi
    start_job
    if [[ "$SUPERVISE" == 1 && "$DRY_RUN" != 1 ]]; then supervise; fi ;;
  status)
    echo "slice $NAME: $(slice_state)"
    worker_statuses ;;
  logs) print_logs "${WORKER:-all}" ;;
  stop) on_workers all "pkill -TERM -f igpt_jax.main && echo 'SIGTERM sent on '\$(hostname) || \
echo 'no job on '\$(hostname)" ;;
  delete) delete_slice ;;
esac
