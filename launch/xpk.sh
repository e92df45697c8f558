#!/usr/bin/env bash
# Runs the trainer as an xpk workload on a GKE TPU cluster (one pod per TPU host; xpk sets
# TPU_WORKER_HOSTNAMES / MEGASCALE_* and blip3o_jax.distributed joins the processes). Usage:
#
#   PROJECT=my-project ZONE=us-east5-a CLUSTER=blip3o TPU_TYPE=v5p-64 \
#   IMAGE=us-docker.pkg.dev/my-project/blip3o/blip3o_jax:latest \
#   WORKDIR=/gcs/my-bucket/runs/blip3o_8b CONFIG=configs/blip3o_8b.py \
#   EXTRA="--config.mesh.data=32 --config.mesh.fsdp=1" launch/xpk.sh [cluster|image|run|all]
#
# WORKDIR must be shared by all pods: mount a bucket with the GCS FUSE CSI driver (xpk storage
# attach, see launch/README.md) or use a Filestore volume.
set -euo pipefail
: "${PROJECT:?}" "${ZONE:?}" "${CLUSTER:?}" "${TPU_TYPE:?}" "${IMAGE:?}" "${WORKDIR:?}"
CONFIG=${CONFIG:-configs/blip3o_8b.py}
EXTRA=${EXTRA:-}
NUM_SLICES=${NUM_SLICES:-1}
WORKLOAD=${WORKLOAD:-blip3o-$(date +%m%d-%H%M)}

cluster() {
  xpk cluster create --cluster "$CLUSTER" --tpu-type="$TPU_TYPE" --num-slices="$NUM_SLICES" \
    --project="$PROJECT" --zone="$ZONE"
}

image() {
  docker build -f launch/Dockerfile -t "$IMAGE" . && docker push "$IMAGE"
}

run() {
  xpk workload create --cluster "$CLUSTER" --workload "$WORKLOAD" --tpu-type="$TPU_TYPE" \
    --num-slices="$NUM_SLICES" --docker-image="$IMAGE" --project="$PROJECT" --zone="$ZONE" \
    --command "python -m blip3o_jax.train --config $CONFIG --workdir $WORKDIR $EXTRA"
  echo "logs: xpk workload list --cluster $CLUSTER --project=$PROJECT --zone=$ZONE; kubectl logs -f -l jobset.sigs.k8s.io/jobset-name=$WORKLOAD"
}

case "${1:-run}" in
  cluster) cluster ;;
  image) image ;;
  run) run ;;
  all) cluster; image; run ;;
  *) echo "usage: $0 [cluster|image|run|all]" >&2; exit 2 ;;
esac
