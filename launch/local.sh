#!/usr/bin/env bash
# Run igpt_jax as N processes on this machine, each with its own simulated CPU devices, joined by
# jax.distributed (gloo collectives over 127.0.0.1): a rehearsal of a pod slice on a laptop.
#
#   launch/local.sh -n 2 [-d 2] [-p PORT] -- --config=configs/demo.py --config.stage=pretrain \
#       --workdir=runs/two_hosts [--config.FIELD=VALUE ...]
#
# -n  number of processes (default 2)         -d  CPU devices per process (default 1)
# -p  coordinator port (default: a free one)
# Each line of output is prefixed with its process index ("[1] step 10/200 ..."); the line
# "[local] process I pid P" names each process, so a test can signal one of them. When one
# process fails, the others are stopped and the launcher exits with the failed process's
# status; SIGTERM/SIGINT to the launcher is passed on to every process (a preemption): they
# save, exit 75, and so does the launcher once all have (75 = run the same command to resume).
set -euo pipefail

NUM=2 DEVICES=1 PORT=""
usage() { sed -n '2,15p' "$0"; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) NUM="$2"; shift 2 ;;
    -d) DEVICES="$2"; shift 2 ;;
    -p) PORT="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "error: unknown argument $1 (arguments for igpt_jax.main go after --)" >&2; exit 2 ;;
  esac
done
if ! [[ "$NUM" =~ ^[1-9][0-9]*$ && "$DEVICES" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: -n and -d take positive integers" >&2
  exit 2
fi

HERE="$(cd "$(dirname "$0")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$HERE/.venv/bin/python" ]]; then PYTHON="$HERE/.venv/bin/python"; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("igpt_jax") and u.find_spec("absl")))' 2>/dev/null; then
  echo "error: $PYTHON cannot import igpt_jax (no $HERE/.venv here: run \`make install\` in $HERE, or set PYTHON to the python of an environment that has igpt_jax)" >&2
  exit 2
fi
echo "[local] $NUM process(es) x $DEVICES CPU device(s), python $PYTHON"
if [[ -z "$PORT" ]]; then
  PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

pids=()
# A signal to the launcher goes to every process (SIGTERM: they all save and exit).
trap 'for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done' TERM INT

for ((i = 0; i < NUM; i++)); do
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES" JAX_PLATFORMS=cpu \
    "$PYTHON" -u -m igpt_jax.main "$@" --coordinator_address="127.0.0.1:$PORT" \
    --process_count="$NUM" --process_index="$i" \
    > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2) &
  pids+=("$!")
  echo "[local] process $i pid $!"
done

status=0 preempted=0
remaining=("${pids[@]}")
while [[ ${#remaining[@]} -gt 0 ]]; do
  code=0
  wait -n -p done_pid "${remaining[@]}" || code=$?
  if [[ -z "${done_pid:-}" ]]; then continue; fi  # interrupted by a trapped signal
  left=()
  for pid in "${remaining[@]}"; do [[ "$pid" != "$done_pid" ]] && left+=("$pid"); done
  remaining=("${left[@]+"${left[@]}"}")
  if [[ "$code" -eq 75 ]]; then
    # Preempted after a save: the others are saving the same step; let them finish.
    preempted=1
  elif [[ "$code" -ne 0 && "$status" -eq 0 ]]; then
    status=$code
    echo "[local] a process exited with status $code; stopping the others" >&2
    # Not SIGTERM: that would ask them to save a preemption checkpoint with a peer missing.
    for pid in "${remaining[@]+"${remaining[@]}"}"; do kill -KILL "$pid" 2>/dev/null || true; done
  fi
  unset done_pid
done
wait  # the output prefixers
if [[ "$status" -eq 0 && "$preempted" -eq 1 ]]; then
  echo "[local] preempted after a save: run the same command again to resume" >&2
  status=75
fi
exit "$status"
