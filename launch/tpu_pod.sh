#!/usr/bin/env bash
# Run launch.train_rater on every worker of a Cloud TPU VM pod (one process per worker host).
#
#   launch/tpu_pod.sh setup TPU_NAME ZONE            # copy this checkout to all workers, install
#   launch/tpu_pod.sh train TPU_NAME ZONE WORKDIR [--config=... --config.x=y ...]
#
# WORKDIR must be storage every worker sees at the same path (a Filestore/NFS mount, or a GCS
# bucket mounted with gcsfuse): checkpoints are written by all processes, logs and reports by
# process 0. Each worker calls jax.distributed.initialize() (--distributed), which reads the pod's
# topology from the TPU metadata; one mesh spans every chip. Data other than the bundled digits
# must be prepared (array_record) in a data_dir that every worker can read.
# DRY_RUN=1 prints the gcloud commands instead of running them.
set -euo pipefail

run() { if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }

usage() { sed -n '2,5p' "$0" >&2; exit 2; }
[[ $# -ge 3 ]] || usage
action=$1 tpu=$2 zone=$3
shift 3
remote_dir='~/datarater'

case "$action" in
  setup)
    run gcloud compute tpus tpu-vm scp --recurse --zone="$zone" --worker=all \
      "$(cd "$(dirname "$0")/.." && pwd)" "$tpu:$remote_dir"
    run gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command \
      "cd $remote_dir && python3 -m pip install -q -r requirements.txt 'jax[tpu]'"
    ;;
  train)
    [[ $# -ge 1 ]] || usage
    workdir=$(printf '%q' "$1")  # quoted for the worker's shell, as every argument after it
    shift
    args=''
    if [[ $# -gt 0 ]]; then args=$(printf '%q ' "$@"); fi
    run gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command \
      "cd $remote_dir && python3 -m launch.train_rater --distributed --workdir=$workdir $args"
    ;;
  *) usage ;;
esac
