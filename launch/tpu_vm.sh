#!/usr/bin/env bash
# Trains on a Cloud TPU VM slice: create it, copy this repository to every worker, install, and start
# the same trainer command on all workers at once (one JAX process per host; blip3o_jax.distributed
# detects the TPU VM and joins the processes). Usage, from the repository root:
#
#   PROJECT=my-project ZONE=us-central2-b TPU=blip3o-v4-32 ACCELERATOR=v4-32 \
#   WORKDIR=/gcs/my-bucket/runs/blip3o_8b CONFIG=configs/blip3o_8b.py \
#   EXTRA="--config.mesh.data=4 --config.mesh.fsdp=4 --config.train.init_from=/gcs/my-bucket/ckpt/blip3o_8b" \
#   launch/tpu_vm.sh [create|copy|install|train|all]
#
# WORKDIR must be one directory that every host sees (Orbax writes one checkpoint from all hosts):
# a Cloud Storage FUSE mount (see launch/README.md) or a Filestore/NFS share.
set -euo pipefail
: "${PROJECT:?}" "${ZONE:?}" "${TPU:?}" "${ACCELERATOR:?}" "${WORKDIR:?}"
CONFIG=${CONFIG:-configs/blip3o_8b.py}
EXTRA=${EXTRA:-}
# Runtime image per TPU generation (Cloud TPU docs): v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite,
# v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e.
VERSION=${VERSION:-tpu-ubuntu2204-base}
REMOTE_DIR=${REMOTE_DIR:-blip3o_jax}
gc() { gcloud compute tpus tpu-vm "$@" --project="$PROJECT" --zone="$ZONE"; }

create() {
  gc create "$TPU" --accelerator-type="$ACCELERATOR" --version="$VERSION"
}

copy() {
  # Only what the runtime needs (no .venv, runs/ or test caches).
  tar czf /tmp/blip3o_jax_src.tgz --exclude=.venv --exclude=runs --exclude=.git --exclude=.pytest_cache \
    blip3o_jax configs launch requirements.txt
  gc scp /tmp/blip3o_jax_src.tgz "$TPU":/tmp/ --worker=all
  gc ssh "$TPU" --worker=all --command="mkdir -p ~/$REMOTE_DIR && tar xzf /tmp/blip3o_jax_src.tgz -C ~/$REMOTE_DIR"
}

install() {
  # jax 0.10.2 needs Python >= 3.11; Ubuntu 22.04 TPU images ship 3.10, so take 3.11 from deadsnakes.
  gc ssh "$TPU" --worker=all --command="set -e
    if ! command -v python3.11 >/dev/null; then
      sudo add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get update -q
      sudo apt-get install -y -q python3.11 python3.11-venv
    fi
    cd ~/$REMOTE_DIR && python3.11 -m venv .venv
    .venv/bin/pip install -q -r requirements.txt -e . 'jax[tpu]==0.10.2'"
}

train() {
  # Same command on every worker, started together; re-running it resumes from the newest checkpoint.
  gc ssh "$TPU" --worker=all --command="cd ~/$REMOTE_DIR && \
    nohup .venv/bin/python -m blip3o_jax.train --config $CONFIG --workdir $WORKDIR $EXTRA \
    > train.log 2>&1 &"
  echo "started; follow worker 0 with: gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=0 --command='tail -f ~/$REMOTE_DIR/train.log'"
}

case "${1:-all}" in
  create) create ;;
  copy) copy ;;
  install) install ;;
  train) train ;;
  all) create; copy; install; train ;;
  *) echo "usage: $0 [create|copy|install|train|all]" >&2; exit 2 ;;
esac
