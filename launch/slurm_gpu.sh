#!/usr/bin/env bash
# SLURM GPU cluster: one process per node, each driving all GPUs of its node through pmap.
#   sbatch --nodes=4 --gres=gpu:8 --ntasks-per-node=1 launch/slurm_gpu.sh [CONFIG] [WORKDIR] [extra flags]
# Install first (on a shared filesystem): python3.11 -m venv .venv && .venv/bin/pip install -r requirements.txt -e .
#   && .venv/bin/pip install 'jax[cuda12]==0.10.2'
# jax.distributed.initialize() reads the coordinator, process count and id from SLURM's environment.
# A preempted or time-limited job resumes from the latest checkpoint in WORKDIR when requeued.
#SBATCH --job-name=hivlp_jax
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
config=${1:-configs/base_b16.py}
workdir=${2:-runs/base_b16}
shift $(( $# > 2 ? 2 : $# ))
export TF_CPP_MIN_LOG_LEVEL=2
srun .venv/bin/python -m hivlp_jax.main --distributed --config="$config" --workdir="$workdir" "$@"
