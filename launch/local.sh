#!/usr/bin/env bash
# Runs the main job on this machine: train + evaluate.
#   launch/local.sh [CONFIG] [WORKDIR] [extra flags, e.g. --config.num_train_steps=100]
# On a CPU-only machine, HIVLP_CPU_DEVICES simulated devices run the pmapped step (default 2: on a
# 2-core CPU, 2 devices measured 0.660 s/step against 0.672 s/step for 1; see README).
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/default.py}
workdir=${2:-runs/default}
shift $(( $# > 2 ? 2 : $# ))
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
backend=$(TF_CPP_MIN_LOG_LEVEL=3 "$python" -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo cpu)
if [ "$backend" = cpu ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${HIVLP_CPU_DEVICES:-2}"
  # HIVLP_HUGEPAGES=1: XLA's CPU step maps fresh memory for its temporaries on every call, ~275k page faults
  # per step of the 3.9M-parameter model in 4 KB pages. Transparent huge pages for malloc (glibc >= 2.35)
  # cut them 14x and the step time 1.44x (docs/results.md, "Against open_clip"). Opt-in (hivlp_jax/host_memory.py).
  if [ "${HIVLP_HUGEPAGES:-0}" = 1 ]; then
    export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1"
  fi
fi
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
exec "$python" -m hivlp_jax.main --config="$config" --workdir="$workdir" "$@"
