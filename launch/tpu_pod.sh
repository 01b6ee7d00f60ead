#!/usr/bin/env bash
# Start k25jax training on a Cloud TPU VM pod slice (issue 9 item 4): create the slice or reuse it, copy the repo
# to every worker, install the requirements with the TPU build of jax, and run the same command on all workers;
# `launch.train` calls `jax.distributed.initialize()`, which finds the slice's coordinator from the TPU metadata.
#
#   TPU_NAME=k25-v5p ZONE=us-east5-a ACCELERATOR=v5p-2048 RUNTIME=v2-alpha-tpuv5 \
#     launch/tpu_pod.sh --config=k25_full --steps=100 --ckpt_dir=gs://BUCKET/k25 \
#       --config.mesh.fsdp=128 --config.mesh.expert=8 --config.mesh.data=1
#
# Plan and per-device memory for each topology: launch/README.md (checked first with `python -m launch.aot`).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME, e.g. k25-v5p}"
: "${ZONE:?set ZONE, e.g. us-east5-a}"
ACCELERATOR="${ACCELERATOR:-v5p-2048}"    # v5p-2048 = 1024 chips (v5p counts TensorCores, 2 per chip)
RUNTIME="${RUNTIME:-v2-alpha-tpuv5}"       # tpu7x: v2-alpha-tpu7-ubuntu2404; v6e: v2-alpha-tpuv6e
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REMOTE_DIR="${REMOTE_DIR:-k25jax}"
JAX_VERSION="$(python3 -c 'import re;print(re.search(r"^jax==(\S+)", open("requirements.txt").read(), re.M).group(1))' \
  2>/dev/null || echo 0.10.2)"

if ! gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG >/dev/null 2>&1; then
  echo "creating $ACCELERATOR slice $TPU_NAME in $ZONE"
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG \
    --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
else
  echo "reusing $TPU_NAME"
fi

ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="$1"; }

tar --exclude=.venv --exclude=.cache --exclude=.git -czf /tmp/k25jax.tgz .
gcloud compute tpus tpu-vm scp /tmp/k25jax.tgz "$TPU_NAME":/tmp/k25jax.tgz --zone="$ZONE" $PROJECT_FLAG --worker=all
ssh_all "mkdir -p $REMOTE_DIR && tar -xzf /tmp/k25jax.tgz -C $REMOTE_DIR && cd $REMOTE_DIR && \
  python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==$JAX_VERSION'"

# The same command on every worker; quote the arguments for the remote shell.
ARGS="$(printf ' %q' "$@")"
ssh_all "cd $REMOTE_DIR && PYTHONPATH=. .venv/bin/python -m launch.train$ARGS"
