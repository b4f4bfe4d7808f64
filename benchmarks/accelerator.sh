#!/bin/bash
# One prepared run on a machine with one accelerator (GPU or TPU host). PARTS (comma-separated):
#   steps      the train step at ViT-B/16 + BERT-base size (configs/base_b16.py): inbatch (1024, remat), cots
#              (1024, remat, queue + KL + filter + MLM + MVM), accum (4096 in 16 micro-batches), b256; each
#              also a part of its own
#   gap        inbatch with config.model.image.pool='gap' (196 ViT tokens: cuDNN flash attention on a GPU)
#   video      the video step: 128 clips of 12 frames at 224 px (MSR-VTT's shape), remat, temporal Transformer
#   retrieval  the retrieval benchmark at 1M x 768: exact search on the accelerator, then the CPU methods
#              pinned to 2 cores (the issue's target machine)
# Each part has its own time limit inside DEADLINE_S, so one that hangs or fails leaves the others' numbers.
# Compilation dominates (about 1-2 minutes per base_b16 step on one H200). Results go to OUT_DIR.
#
#   bash benchmarks/accelerator.sh OUT_DIR [PARTS] [DEADLINE_S]
set -u
out=${1:-benchmarks/results/accelerator}
parts=${2:-steps,retrieval}
deadline=${3:-570}
config=${CONFIG:-configs/base_b16.py}  # CONFIG=configs/default.py VOCAB=1000: a quick try of the script on a CPU.
vocab=${VOCAB:-30522}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}  # JAX's default takes 75%.
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null

limit() {  # limit WANTED_S: WANTED_S, or what is left before the deadline if that is less.
  local left=$((deadline - SECONDS))
  echo $((left < $1 ? (left > 0 ? left : 1) : $1))
}

step() {  # step LIMIT_S FLAGS...: one variant of benchmarks/train_step.py; fails if it did.
  local wanted=$1; shift
  echo "== train step: $* (limit $(limit "$wanted") s, at ${SECONDS} s)"
  timeout "$(limit "$wanted")" python3 benchmarks/train_step.py --config="$config" --vocab_size="$vocab" \
    --warmup_steps=2 --steps=8 --peak_tflops=989 --out="$out/train_step.jsonl" "$@" >"$out/step.log" 2>&1
  local status=$?
  grep -E '"(median_step_s|examples_per_s|step_gflops|fraction_of_peak|compile_s)"|step [0-9.]+ s|not fit|Error|error:|cuDNN' \
    "$out/step.log" | cut -c1-400
  cat "$out/step.log" >>"$out/steps_full.log"
  [[ $status == 0 ]] || echo "(no result: exit $status)"
  return $status
}

want() {  # want PART: whether PARTS names it ('steps' names every image step).
  [[ ,$parts, == *,$1,* ]] || { [[ $1 =~ ^(inbatch|cots|accum|b256)$ ]] && [[ ,$parts, == *,steps,* ]]; }
}

cots=(--config.contrastive.queue_size=65536 --config.contrastive.kl_weight=1.0
      --config.contrastive.filter_noisy_pairs=True --config.mvlm.mlm_weight=1.0 --config.mvlm.mvm_weight=1.0
      --config.visual_tokenizer.codes_file=unused.npy)
# Where a batch does not fit (exit 3, after its compile), the same global batch in more micro-batches.
if want inbatch; then
  step 170 --config.batch_size=1024 --config.model.remat=block
  [[ $? == 3 ]] && step 150 --config.batch_size=1024 --config.model.remat=block --config.accumulation_steps=4
fi
want gap && step 170 --config.batch_size=1024 --config.model.remat=block --config.model.image.pool=gap
if want cots; then
  step 210 --config.batch_size=1024 --config.model.remat=block "${cots[@]}"
  [[ $? == 3 ]] && step 180 --config.batch_size=1024 --config.model.remat=block --config.accumulation_steps=4 "${cots[@]}"
fi
if want video; then  # configs/msrvtt.py's step: 12 frames of 224 px per clip, temporal Transformer.
  step 200 --config.batch_size=128 --config.model.remat=block --frames=12 --config.model.video.num_frames=12 \
    --config.model.video.temporal=transformer --config.model.video.depth=4
fi
want accum && step 160 --config.batch_size=4096 --config.accumulation_steps=16
want b256 && step 110 --config.batch_size=256

if [[ ,$parts, == *,retrieval,* ]]; then
  echo "== retrieval 1M x 768: exact search on $(python3 -c 'import jax; print(jax.default_backend())')"
  timeout "$(limit 100)" python3 benchmarks/retrieval.py --sizes=1000000 --threads=0 --methods=exact_jax \
    --latency_queries=50 --repeats=3 --out="$out/retrieval_accelerator.json" --plot= 2>&1 | grep -v '^I[0-9]' | tail -4
  echo "== retrieval 1M x 768: CPU methods on 2 cores"
  JAX_PLATFORMS=cpu timeout "$(limit 260)" taskset -c 0,1 python3 benchmarks/retrieval.py --sizes=1000000 --threads=2 \
    --methods=exact_jax,faiss_flat,two_stage --two_stage=64:300:truncate,64:200:truncate,64:200:rerank \
    --latency_queries=50 --repeats=3 --out="$out/retrieval_2cores.json" --plot="$out/retrieval_2cores.png" \
    2>&1 | grep -v '^I[0-9]' | tail -12
fi
echo "(done at ${SECONDS} s)"
