#!/usr/bin/env bash
# Train MLC-NC on a Cloud TPU VM pod slice: one process per TPU VM worker, all
# started at once by `gcloud ... ssh --worker=all`. See docs/scaling.md.
#
# Usage:
#   scripts/launch_tpu_pod.sh create    # create the pod slice
#   scripts/launch_tpu_pod.sh install   # install the package on every worker
#   scripts/launch_tpu_pod.sh data      # copy COCO from the bucket to every worker's disk
#   scripts/launch_tpu_pod.sh train     # run.py --multihost on every worker
#   scripts/launch_tpu_pod.sh logs      # follow worker 0's log
#   scripts/launch_tpu_pod.sh delete    # delete the pod slice
#
# Settings come from the environment (defaults below), e.g.
#   TPU_NAME=mlcnc ZONE=us-central2-b ACCELERATOR=v4-32 BUCKET=gs://my-bucket \
#     scripts/launch_tpu_pod.sh train
# Extra arguments after the command go to run.py, e.g.
#   scripts/launch_tpu_pod.sh train --config.train.batch_size=256
set -euo pipefail

TPU_NAME="${TPU_NAME:-mlcnc}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR="${ACCELERATOR:-v4-32}"               # 4 VMs x 4 chips
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null)}"
REPO_URL="${REPO_URL:-https://github.com/OWNER/mlcnc_jax.git}"  # this repository
JAX_VERSION="${JAX_VERSION:-0.10.2}"               # as requirements.txt
BUCKET="${BUCKET:?set BUCKET=gs://your-bucket}"
CONFIG="${CONFIG:-coco_lt}"                         # a built-in config name or a file
RUN_NAME="${RUN_NAME:-${CONFIG}}"
# Checkpoints and TensorBoard summaries go to the bucket: every worker sees it.
WORKDIR="${WORKDIR:-${BUCKET}/mlcnc/${RUN_NAME}}"
# COCO on each worker's local disk (every host reads only its own images, but any host
# may need any image): copied from the bucket by `data`.
DATA_DIR="${DATA_DIR:-/home/${USER}/data/coco}"
DATA_BUCKET="${DATA_BUCKET:-${BUCKET}/coco}"        # annotations/, train2017/, val2017/, lt_splits/
WEIGHTS="${WEIGHTS:-${DATA_DIR}/resnet50_imagenet.safetensors}"

ssh_all() {
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --project="${PROJECT}" \
    --worker=all --command="$1"
}

cmd="${1:-}"
shift || true
case "${cmd}" in
  create)
    gcloud compute tpus tpu-vm create "${TPU_NAME}" --zone="${ZONE}" --project="${PROJECT}" \
      --accelerator-type="${ACCELERATOR}" --version="${RUNTIME}"
    ;;
  install)
    ssh_all "pip install -U pip && pip install 'jax[tpu]==${JAX_VERSION}' && pip install 'git+${REPO_URL}'"
    ;;
  data)
    ssh_all "mkdir -p ${DATA_DIR} && gcloud storage cp -r '${DATA_BUCKET}/*' ${DATA_DIR}/"
    ;;
  train)
    # Every worker runs the same command; JAX finds the coordinator, the process count
    # and this worker's index itself on TPU VMs (no --coordinator_address needed).
    # nohup: the run survives the ssh session; the log stays on each worker.
    ssh_all "nohup mlcnc --multihost --config=${CONFIG} --workdir=${WORKDIR} \
      --config.data.root=${DATA_DIR} --config.model.pretrained=${WEIGHTS} $* \
      > ~/mlcnc_${RUN_NAME}.log 2>&1 &"
    echo "Started on every worker. TensorBoard: tensorboard --logdir=${WORKDIR}"
    ;;
  logs)
    gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --project="${PROJECT}" \
      --worker=0 --command="tail -f ~/mlcnc_${RUN_NAME}.log"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "${TPU_NAME}" --zone="${ZONE}" --project="${PROJECT}" --quiet
    ;;
  *)
    sed -n '2,18p' "$0"
    exit 2
    ;;
esac
