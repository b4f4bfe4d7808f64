#!/usr/bin/env bash
# Multi-host TPU VM (pod slice): installs the pinned stack plus libtpu on every worker, copies the repo,
# and runs the same command on all workers; jax.distributed.initialize() finds the coordinator itself.
#   launch/tpu_vm.sh TPU_NAME ZONE [CONFIG] [WORKDIR] [extra flags]
# WORKDIR must be shared by all workers (e.g. a gs:// bucket path) so that checkpoints and resume work.
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}
config=${3:-configs/base_b16.py}; workdir=${4:?a workdir every worker can reach, e.g. gs://bucket/run}
shift $(( $# > 4 ? 4 : $# ))
ssh() { gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="$1"; }
gcloud compute tpus tpu-vm scp --recurse --zone="$zone" --worker=all "$(dirname "$0")/.." "$tpu":hivlp_jax_repo
ssh "cd hivlp_jax_repo && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt -e . \
  && .venv/bin/pip install -q 'jax[tpu]==0.10.2'"
ssh "cd hivlp_jax_repo && TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python -m hivlp_jax.main --distributed \
  --config=$config --workdir=$workdir $*"
