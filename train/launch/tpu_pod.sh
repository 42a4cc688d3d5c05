#!/usr/bin/env bash
# Run `python -m train.main` on every worker of a Cloud TPU pod slice (one process per host;
# jax.distributed.initialize() finds the coordinator through the TPU metadata).
#
#   train/launch/tpu_pod.sh TPU_NAME ZONE [--setup] -- --config configs/stage2.py --workdir gs-or-nfs/run
#
# --setup first creates .venv on every worker from the pinned requirements plus jax[tpu].
# The repository must already be at $REPO on every worker (e.g. `git clone` there, or an NFS
# mount); the workdir must be shared storage all workers see (checkpoints are written by all).
# Env: REPO (default ~/medvlm-jax), PROJECT (default: gcloud's), JAX_TPU_VERSION (default: the
# pinned jax version), EXTRA_ENV (variables set for training, e.g. "LIBTPU_INIT_ARGS=...").
set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '2,13p' "$0"; exit 2
fi
TPU="$1"; ZONE="$2"; shift 2
SETUP=0
if [[ "${1:-}" == "--setup" ]]; then SETUP=1; shift; fi
if [[ "${1:-}" == "--" ]]; then shift; fi

REPO="${REPO:-~/medvlm-jax}"
PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null)}"
JAX_VERSION="${JAX_TPU_VERSION:-$(sed -n 's/^jax==//p' "$(dirname "$0")/../../requirements.txt")}"

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --project "$PROJECT" --worker=all \
    --command "$1"
}

if [[ $SETUP == 1 ]]; then
  ssh_all "cd $REPO && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt \
    'jax[tpu]==$JAX_VERSION' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
fi

ARGS=$(printf ' %q' "$@")
ssh_all "cd $REPO && ${EXTRA_ENV:-} .venv/bin/python -m train.main --distributed=on$ARGS"
