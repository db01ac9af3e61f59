#!/usr/bin/env bash
# Runs N copies of a command on this machine as one multi-process JAX job on CPU, the way a
# multi-host job runs (tests, debugging sharding and checkpoint code without a cluster).
#
#   launch/local_multiprocess.sh N [-- ] COMMAND...
#   launch/local_multiprocess.sh 2 -- python -m jova_jax.train --config=configs/tiny.py --workdir=runs/mp
#
# Each process gets:
#   JOVA_COORDINATOR=127.0.0.1:$PORT, JOVA_NUM_PROCESSES=N, JOVA_PROCESS_ID=i
#       read by jova_jax/parallel/mesh.py initialize_distributed (--distributed=env, gloo on CPU)
#   JAX_PLATFORMS=cpu
#   XLA_FLAGS=--xla_force_host_platform_device_count=K    K fake devices per process
#   PJRT_NPROC=max(2K+1, cores)  XLA CPU's thread pool: one thread per fake device can deadlock
#       collectives that start in different orders on different devices; no more, as idle pool
#       threads spin (the same rule as tests/conftest.py)
#   JAX_COMPILATION_CACHE_DIR                              persistent compilation cache
# Environment knobs: DEVICES_PER_PROCESS (K, default 4), PORT (default: a free port),
# LOG_DIR (default: a temp dir; process i writes LOG_DIR/process_i.log, process 0 also to stdout),
# JAX_COMPILATION_CACHE_DIR (default ~/.cache/jova_jax/xla).
# Waits for every process; exits non-zero (and stops the others) as soon as one fails.
set -euo pipefail

if [[ $# -lt 2 || ! "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NUM_PROCESSES [--] COMMAND..." >&2
  exit 2
fi
num_processes=$1
shift
[[ "$1" == "--" ]] && shift
[[ $# -ge 1 ]] || { echo "$0: no command given after --" >&2; exit 2; }

devices=${DEVICES_PER_PROCESS:-4}
port=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
log_dir=${LOG_DIR:-$(mktemp -d -t jova_mp.XXXXXX)}
mkdir -p "$log_dir"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/jova_jax/xla}
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}"
cores=$(nproc)
export PJRT_NPROC=${PJRT_NPROC:-$(( 2 * devices + 1 > cores ? 2 * devices + 1 : cores ))}
export JOVA_COORDINATOR="127.0.0.1:${port}" JOVA_NUM_PROCESSES="${num_processes}"

pids=()      # live process ids
declare -A index_of  # pid -> process id
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap stop_all INT TERM

for ((i = 0; i < num_processes; i++)); do
  if [[ $i -eq 0 ]]; then
    JOVA_PROCESS_ID=$i "$@" > >(tee "$log_dir/process_$i.log") 2>&1 &
  else
    JOVA_PROCESS_ID=$i "$@" > "$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=($!)
  index_of[$!]=$i
done
echo "$0: $num_processes processes x $devices CPU devices, coordinator $JOVA_COORDINATOR, logs in $log_dir" >&2

# Wait for whichever finishes first; one failure stops the rest (a lone survivor would hang in
# its next collective).
while [[ ${#pids[@]} -gt 0 ]]; do
  status=0
  finished=
  wait -n -p finished "${pids[@]}" || status=$?
  live=()
  for pid in "${pids[@]}"; do [[ $pid == "$finished" ]] || live+=("$pid"); done
  pids=("${live[@]}")
  if [[ $status -ne 0 ]]; then
    i=${index_of[$finished]}
    echo "$0: process $i failed (exit $status); see $log_dir/process_$i.log" >&2
    stop_all
    wait || true
    exit "$status"
  fi
done
echo "$0: all $num_processes processes succeeded" >&2
