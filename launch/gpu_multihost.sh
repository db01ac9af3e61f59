#!/usr/bin/env bash
# Runs one jova-jax process on this GPU host as part of a multi-host job; start it on every host
# (your scheduler, pdsh, or by hand) with the same COORDINATOR and NUM_PROCESSES.
#
#   COORDINATOR=10.0.0.1:8476 NUM_PROCESSES=8 PROCESS_ID=3 \
#     launch/gpu_multihost.sh -- python -m jova_jax.train --config=configs/jova_24b.py --workdir=/shared/runs/x
#
# One process per host drives all of its local GPUs (jax.local_devices()); the global mesh spans
# NUM_PROCESSES x local GPUs. Environment read here:
#   COORDINATOR     host:port of process 0, reachable from every host   -> JOVA_COORDINATOR
#   NUM_PROCESSES   processes in the job (= hosts)                       -> JOVA_NUM_PROCESSES
#   PROCESS_ID      0 .. NUM_PROCESSES-1, unique per host                -> JOVA_PROCESS_ID
#   (MASTER_ADDR/MASTER_PORT, WORLD_SIZE, RANK / NODE_RANK as set by torchrun-style launchers
#    are accepted as fall-backs.)
#   JAX_COMPILATION_CACHE_DIR  persistent compilation cache on a shared filesystem
#                              (default ~/.cache/jova_jax/xla): later runs skip the compile.
# XLA flags set here (see docs/scaling.md):
#   --xla_gpu_enable_latency_hiding_scheduler=true   overlap FSDP all-gathers / reduce-scatters
#                                                     with the matmuls of the neighbouring layer
#   --xla_gpu_enable_triton_gemm=false               cuBLAS GEMMs (faster for these shapes)
#   --xla_gpu_enable_command_buffer=                 no CUDA graphs (large scanned programs)
#   --xla_gpu_all_reduce_combine_threshold_bytes, --xla_gpu_all_gather_combine_threshold_bytes,
#   --xla_gpu_reduce_scatter_combine_threshold_bytes  combine small collectives into 1 GiB ones
#   XLA_PYTHON_CLIENT_MEM_FRACTION=0.95               let XLA take 95% of HBM up front
# Extra flags: append to XLA_FLAGS before calling. NCCL: set NCCL_SOCKET_IFNAME / NCCL_IB_HCA for
# your fabric if NCCL picks the wrong interface.
# DRY_RUN=1: print the environment this script sets and the command, and run nothing.
set -euo pipefail

[[ "${1:-}" == "--" ]] && shift
[[ $# -ge 1 ]] || { echo "usage: COORDINATOR=host:port NUM_PROCESSES=N PROCESS_ID=i $0 -- COMMAND..." >&2; exit 2; }

coordinator=${COORDINATOR:-${MASTER_ADDR:+${MASTER_ADDR}:${MASTER_PORT:-8476}}}
num_processes=${NUM_PROCESSES:-${WORLD_SIZE:-}}
process_id=${PROCESS_ID:-${NODE_RANK:-${RANK:-}}}
for name in coordinator num_processes process_id; do
  if [[ -z "${!name}" ]]; then
    echo "$0: ${name} is not set (COORDINATOR / NUM_PROCESSES / PROCESS_ID)" >&2
    exit 2
  fi
done

export JOVA_COORDINATOR=$coordinator JOVA_NUM_PROCESSES=$num_processes JOVA_PROCESS_ID=$process_id
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/jova_jax/xla}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
export XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true \
--xla_gpu_enable_triton_gemm=false \
--xla_gpu_enable_command_buffer= \
--xla_gpu_all_reduce_combine_threshold_bytes=1073741824 \
--xla_gpu_all_gather_combine_threshold_bytes=1073741824 \
--xla_gpu_reduce_scatter_combine_threshold_bytes=1073741824 \
${XLA_FLAGS:-}"

if [[ -n "${DRY_RUN:-}" ]]; then
  for name in JOVA_COORDINATOR JOVA_NUM_PROCESSES JOVA_PROCESS_ID JAX_COMPILATION_CACHE_DIR \
      XLA_PYTHON_CLIENT_MEM_FRACTION XLA_FLAGS; do
    echo "export ${name}=$(printf '%q' "${!name}")"
  done
  printf '%q ' "$@"
  echo
  exit 0
fi
echo "$0: process $JOVA_PROCESS_ID of $JOVA_NUM_PROCESSES, coordinator $JOVA_COORDINATOR" >&2
exec "$@"
