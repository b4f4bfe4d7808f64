#!/bin/bash
# One prepared run on a machine with one accelerator (GPU or TPU host): the train step of the COTS variants at
# ViT-B/16 + BERT-base size, and the retrieval benchmark at 1M x 768, exact search on the accelerator beside
# the CPU methods pinned to 2 cores (the target machine). Each part has its own time limit, so one
# that hangs or fails leaves the others' numbers. Results go to OUT_DIR (JSON lines / JSON and a log).
# On one H200 the three train steps and the exact search took over 9 minutes (mostly compilation), so
# with a 10-minute budget run the 2-core part on its own.
#
#   bash benchmarks/accelerator.sh OUT_DIR [STEP_BATCH]
set -u
out=${1:-benchmarks/results/accelerator}
batch=${2:-256}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}.
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null

step() {  # step LIMIT_S CONFIG FLAGS...: one variant of benchmarks/train_step.py.
  local limit=$1 config=$2; shift 2
  echo "== train step: $config $*"
  timeout "$limit" python3 benchmarks/train_step.py --config="$config" --steps=10 --out="$out/train_step.jsonl" "$@" \
    2>&1 | grep -E '"(median_step_s|examples_per_s|step_gflops|fraction_of_peak|matmul_peak_gflops_per_s)"|Error|error:' \
    || echo "(no result)"
  echo "(done at ${SECONDS} s)"
}
cots=(--config.contrastive.queue_size=65536 --config.contrastive.kl_weight=1.0 --config.contrastive.filter_noisy_pairs=True)
mvlm=(--config.mvlm.mlm_weight=1.0 --config.mvlm.mvm_weight=1.0 --config.visual_tokenizer.codes_file=unused.npy)
step 120 configs/default.py --vocab_size=196
step 150 configs/base_b16.py --vocab_size=30522 --config.batch_size="$batch"
step 180 configs/base_b16.py --vocab_size=30522 --config.batch_size="$batch" "${cots[@]}" "${mvlm[@]}"

echo "== retrieval 1M x 768: exact search on $(python3 -c 'import jax; print(jax.default_backend())')"
timeout 100 python3 benchmarks/retrieval.py --sizes=1000000 --threads=0 --methods=exact_jax --latency_queries=50 \
  --repeats=3 --out="$out/retrieval_accelerator.json" --plot= 2>&1 | grep -v '^I[0-9]' | tail -4
echo "== retrieval 1M x 768: CPU methods on 2 cores"
JAX_PLATFORMS=cpu timeout 260 taskset -c 0,1 python3 benchmarks/retrieval.py --sizes=1000000 --threads=2 \
  --methods=exact_jax,faiss_flat,two_stage --two_stage=64:300:truncate,64:200:truncate,64:200:rerank \
  --latency_queries=50 --repeats=3 --out="$out/retrieval_2cores.json" --plot="$out/retrieval_2cores.png" \
  2>&1 | grep -v '^I[0-9]' | tail -12
echo "(done at ${SECONDS} s)"
