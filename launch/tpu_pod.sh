#!/usr/bin/env bash
# jova-jax on a Cloud TPU pod slice: copy this checkout to every worker, install it, and run the
# same command on all workers at once (one process per TPU VM host).
#
#   TPU_NAME=jova-v5p-256 ZONE=us-east5-a [PROJECT=my-proj] \
#     launch/tpu_pod.sh [setup|run|both] -- python -m jova_jax.train --config=configs/jova_24b.py \
#       --workdir=gs://bucket/runs/x
#
#   setup  copy the repo (git-tracked files) to ~/jova-jax on every worker and install
#          requirements + jax[tpu] into ~/jova-jax/.venv
#   run    run the command after -- in ~/jova-jax on every worker (default mode: both)
#
# No coordinator variables are needed: on a pod slice each worker's process finds its peers
# from the TPU VM metadata server (--distributed=auto detects it; jova_jax/parallel/mesh.py
# initialize_distributed), several slices included (MEGASCALE_* in the metadata's tpu-env).
# The workdir must be on storage all workers share (GCS or a filestore).
# DRY_RUN=1: print the exact gcloud commands (each runs its --command on every worker, which
# all share one environment: a worker's index comes from the metadata server) and run nothing
# remote; no gcloud or TPU needed.
# Environment knobs:
#   TPU_NAME, ZONE (required), PROJECT (default: gcloud's), REMOTE_DIR (default jova-jax),
#   JAX_TPU_PIN (default jax[tpu]==0.10.2), JAX_COMPILATION_CACHE_DIR (default
#   ~/.cache/jova_jax/xla on each worker; a gs:// path shares one cache across workers and runs).
# LIBTPU_INIT_ARGS set here (see docs/scaling.md):
#   --xla_tpu_enable_latency_hiding_scheduler=true        overlap collectives with compute
#   --xla_tpu_enable_async_collective_fusion=true          async all-gather / reduce-scatter fusions
#   --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true
#   --xla_tpu_enable_async_collective_fusion_multiple_steps=true
#   --xla_tpu_overlap_compute_collective_tc=true           run collectives beside TensorCore work
#   --xla_enable_async_all_gather=true                     FSDP weight gathers ahead of use
#   --xla_tpu_enable_data_parallel_all_reduce_opt=true     gradient all-reduce / reduce-scatter
#   --xla_tpu_data_parallel_opt_different_sized_ops=true   ... also for differently sized tensors
# Extra libtpu flags: set LIBTPU_INIT_ARGS here before calling; they are appended.
# The command runs in the foreground of the ssh sessions (run this script under tmux/screen);
# gcloud prefixes each worker's output with its worker index.
set -euo pipefail

mode=both
if [[ "${1:-}" =~ ^(setup|run|both)$ ]]; then mode=$1; shift; fi
[[ "${1:-}" == "--" ]] && shift
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}" "${ZONE:?set ZONE, e.g. us-east5-a}"
if [[ "$mode" != setup && $# -eq 0 ]]; then
  echo "usage: TPU_NAME=... ZONE=... $0 [setup|run|both] -- COMMAND..." >&2
  exit 2
fi

remote_dir=${REMOTE_DIR:-jova-jax}
where=(--zone="$ZONE" ${PROJECT:+--project="$PROJECT"})
run() {  # DRY_RUN: print the command instead
  if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$1"
}

if [[ "$mode" != run ]]; then
  repo_root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
  archive=$(mktemp -t jova_src.XXXXXX.tar.gz)
  git -C "$repo_root" ls-files -z | tar -C "$repo_root" --null -T - -czf "$archive"
  run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":jova_src.tar.gz "${where[@]}" --worker=all
  rm -f "$archive"
  on_all_workers "set -e; mkdir -p ~/$remote_dir && tar -xzf ~/jova_src.tar.gz -C ~/$remote_dir \
    && cd ~/$remote_dir && python3 -m venv .venv && .venv/bin/pip install -q -U pip \
    && .venv/bin/pip install -q -r requirements.txt '${JAX_TPU_PIN:-jax[tpu]==0.10.2}'"
fi

if [[ "$mode" != setup ]]; then
  libtpu_args="--xla_tpu_enable_latency_hiding_scheduler=true \
--xla_tpu_enable_async_collective_fusion=true \
--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true \
--xla_tpu_enable_async_collective_fusion_multiple_steps=true \
--xla_tpu_overlap_compute_collective_tc=true \
--xla_enable_async_all_gather=true \
--xla_tpu_enable_data_parallel_all_reduce_opt=true \
--xla_tpu_data_parallel_opt_different_sized_ops=true"
  cache_dir=${JAX_COMPILATION_CACHE_DIR:-\$HOME/.cache/jova_jax/xla}
  command=$(printf '%q ' "$@")
  on_all_workers "cd ~/$remote_dir && source .venv/bin/activate \
    && export LIBTPU_INIT_ARGS='$libtpu_args ${LIBTPU_INIT_ARGS:-}' \
    && export JAX_COMPILATION_CACHE_DIR=$cache_dir && $command"
fi
