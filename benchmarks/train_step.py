r"""Benchmark of the pmapped train step: median step time, examples/s, FLOP utilisation and memory per device.

  XLA_FLAGS=--xla_force_host_platform_device_count=1 python benchmarks/train_step.py \
      --config=configs/default.py --steps=20 --out=benchmarks/results/train_step.json
The memory levers are config fields: add --config.model.remat=block (or block_full),
--config.model.scan_layers=True and/or --config.accumulation_steps=K to make a table of memory against step
time; --memory_only compiles without running (the accumulation table of docs/results.md). --frames=T times
the video step: clips of T frames through the image tower (with --config.model.video.num_frames=T).

Synthetic batches of the config's shapes, so the number is the step alone (no input pipeline); with
masked vision-language modeling on, masked inputs and random visual-token ids. FLOPs are the model's (MFU):
XLA's cost analysis of the step lowered for one CPU device on the whole global batch, without accumulation
or remat (forward, backward and optimizer), whatever the backend timed. The peak is a measured
matmul in the model's dtype on the same devices, or --peak_tflops (a chip's published dense peak). Memory
is XLA's memory analysis of the compiled step on one device (pmap compiles one program per device):
arguments (state, batch), outputs, temporaries (the activations kept for the backward pass live here),
and the outputs aliased to donated arguments. compile_s is lowering plus compilation of the step.

--profile_steps=N traces N more steps with jax.profiler and reports where the step's time goes: the time of
every executed HLO op (fusion), attributed to a model component by the op's source metadata (attention
projections, attention core, MLP matmuls, GELU, layer norms, ..., forward or backward; the loss; the
optimizer and the step's bookkeeping). On a CPU with several cores the ops overlap on the intra-op threads
and an op's time includes waiting for a busy one; under `taskset -c 0` they run one at a time and their times
add up to the step (docs/results.md).
"""

import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from hivlp_jax import config_lib
from hivlp_jax import masking
from hivlp_jax import replication
from hivlp_jax import train_step
from hivlp_jax.models import encoders

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/default.py', 'Config to benchmark.')
flags.DEFINE_integer('steps', 20, 'Timed steps after 3 warm-up steps.')
flags.DEFINE_integer('vocab_size', 1000, 'Vocabulary size of the text tower.')
flags.DEFINE_string('out', '', 'Append the result as one JSON line to this file.')
flags.DEFINE_integer('warmup_steps', 3, 'Untimed steps first (the first one compiles).')
flags.DEFINE_float('peak_tflops', 0, 'Per-device peak in TFLOP/s for fraction_of_peak (e.g. 989 for an H100/H200 in '
                   'dense bf16); 0 measures a matmul in the model dtype instead.')
flags.DEFINE_integer('frames', 0, 'Clips of this many frames per example in place of images (the video step; set '
                     '--config.model.video.num_frames to match for the temporal Transformer).')
flags.DEFINE_integer('profile_steps', 0, 'Trace this many more steps and report the op time by model component.')
flags.DEFINE_bool('memory_only', False, 'Compile and report the memory analysis only, no timed steps (for steps '
                  'too big to run on the machine at hand, e.g. base_b16 at batch 4096 on a CPU).')


def measured_matmul_peak(dtype: str, size: int, repeats: int = 10) -> float:
  """FLOP/s of a [size, size] matmul in `dtype` (the model's) on every local device at once (pmap)."""
  n = jax.local_device_count()
  a = jnp.ones((n, size, size), dtype)
  matmul = jax.pmap(lambda x: x @ x)
  matmul(a).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * size**3 * n / statistics.median(times)


def step_flops(lowered) -> float:
  # The lowered (not the compiled) program's count: on GPU, the compiled one misses the matmuls that XLA
  # hands to cuBLAS (an H200 run of base_b16 counted 3.7 TFLOP per step, a tenth of an analytic count), and
  # jax 0.11's lowered GPU step gives none.
  analysis = lowered.cost_analysis()
  if isinstance(analysis, list):
    analysis = analysis[0]
  return float(analysis.get('flops', float('nan'))) if analysis else float('nan')


def model_flops(config, state, batch) -> float:
  """FLOPs of one step of `config`'s math on the whole global batch, without accumulation and remat.

  Counted on the step lowered for one CPU device from shapes alone: the lowered GPU step reports no count,
  XLA counts a scanned micro-batch loop's body once, and recomputed forward passes are overhead.
  """
  reference = config.copy_and_resolve_references()
  reference.accumulation_steps = 1
  reference.model.remat = 'none'
  model = train_step.create_model(reference, FLAGS.vocab_size)
  cpu = jax.devices('cpu')[:1]
  # Replicated leaves keep one copy; the batch and the queue shards [devices, n, ...] become [1, devices * n, ...].
  one_copy = lambda x: jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype)
  one_device = lambda x: jax.ShapeDtypeStruct((1, x.shape[0] * x.shape[1]) + x.shape[2:], x.dtype)
  shapes = jax.tree.map(one_copy, state.replace(apply_fn=model.apply, negative_queues=None)).replace(
      negative_queues=jax.tree.map(lambda x: one_device(x) if x.ndim > 1 else one_copy(x), state.negative_queues))
  with encoders.xla_attention():  # Lowered for the CPU: cuDNN attention has no CPU rule.
    lowered = train_step.make_pmapped_train_step(reference, devices=cpu).lower(shapes, jax.tree.map(one_device, batch))
  return step_flops(lowered)


# (pattern of an op's source location, component), first match wins; ops outside the model are the loss's
# (differentiated: jvp) or the optimizer's and the step's bookkeeping (norms, finite guard, EMA, queues).
COMPONENTS = (
    (r'Attention_\d+/(query|key|value|out)/', 'attention projections'),
    (r'Attention', 'attention core (QK, softmax, AV)'),
    (r'MlpBlock_\d+/Dense', 'MLP matmuls'),
    (r'MlpBlock', 'MLP GELU'),
    (r'LayerNorm|/norm/', 'layer norms'),
    (r'block\d+/add', 'residual adds'),
    (r'embed|patch|Conv|posemb', 'embeddings'),
)


def component(op_name: str) -> str:
  """The model component an HLO op's `op_name` metadata belongs to, and forward or backward."""
  if 'TwoTowers' not in op_name:
    return 'loss' if 'jvp(' in op_name else 'optimizer and step bookkeeping'
  direction = 'backward' if 'transpose(' in op_name else 'forward'
  name = next((name for pattern, name in COMPONENTS if re.search(pattern, op_name)), 'other model ops')
  return f'{name}, {direction}'


def time_by_component(compiled, run_steps, steps: int) -> dict:
  """{component: ms of op time per step} of `steps` traced calls of `run_steps(steps)`."""
  op_names = dict(re.findall(r'^\s*(?:ROOT )?%([\w.\-]+) = .*?op_name="([^"]*)"', compiled.as_text(), re.M))
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    run_steps(steps)
    jax.profiler.stop_trace()
    trace_file = sorted(glob.glob(os.path.join(trace_dir, 'plugins', 'profile', '*', '*.trace.json.gz')))[-1]
    with gzip.open(trace_file) as f:
      events = json.load(f)['traceEvents']
  totals = collections.Counter()
  for event in events:  # Complete events named after an op of the step; the runtime's own events are skipped.
    if event.get('ph') == 'X' and event['name'] in op_names:
      totals[component(op_names[event['name']])] += event['dur'] / 1e3 / steps
  return dict(totals.most_common())


def memory_per_device(compiled) -> dict:
  """Bytes of one device's compiled step: {'argument_bytes': ..., 'output_bytes', 'temp_bytes', 'alias_bytes'}."""
  analysis = compiled.memory_analysis()
  if isinstance(analysis, (list, tuple)):  # One per device where the backend reports them separately.
    analysis = analysis[0]
  if analysis is None:  # Backends without the analysis.
    return {}
  return {f'{kind}_bytes': int(getattr(analysis, f'{kind}_size_in_bytes'))
          for kind in ('argument', 'output', 'temp', 'alias')}


def main(argv):
  del argv
  config = FLAGS.config
  config_lib.validate(config)
  model = train_step.create_model(config, FLAGS.vocab_size)
  state = replication.replicate_state(train_step.create_train_state(config, model, jax.random.key(0)))
  num_params = sum(x.size for x in jax.tree.leaves(replication.unreplicate(state).params))
  devices = jax.local_device_count()
  per_device = config.batch_size // devices
  rng = np.random.default_rng(0)
  size, max_len = config.model.image_size, config.model.text.max_len
  visual = (config.batch_size,) + ((FLAGS.frames,) if FLAGS.frames else ()) + (size, size, 3)
  batch = {
      'image': rng.integers(0, 256, visual, dtype=np.uint8),
      'text': rng.integers(5, FLAGS.vocab_size, (config.batch_size, max_len), dtype=np.int32),
  }
  if config.mvlm.mlm_weight or config.mvlm.mvm_weight:  # Masked inputs, and random visual-token ids.
    grid = size // config.model.image.patch_size
    batch['image_codes'] = rng.integers(0, config.visual_tokenizer.codebook_size, (config.batch_size, grid * grid),
                                        dtype=np.int32)
    batch = masking.mask_batch(
        rng, batch, text_mask_ratio=config.mvlm.text_mask_ratio, image_mask_ratio=config.mvlm.image_mask_ratio,
        min_block_patches=config.mvlm.min_block_patches, grid=(grid, grid), mask_id=4, vocab_size=FLAGS.vocab_size,
        special_ids=(0, 1, 2, 3, 4), mask_text_tokens=config.mvlm.mlm_weight > 0,
        mask_patches=config.mvlm.mvm_weight > 0)
  batch = jax.tree.map(lambda x: x.reshape((devices, per_device) + x.shape[1:]), batch)
  p_step = train_step.make_pmapped_train_step(config)
  start = time.perf_counter()
  lowered = p_step.lower(state, batch)
  compiled = lowered.compile()  # Called below: jit's own cache would compile it a second time.
  memory = memory_per_device(compiled)
  compile_s = time.perf_counter() - start
  flops = model_flops(config, state, batch)
  levers = dict(remat=config.model.remat, scan_layers=config.model.scan_layers,
                accumulation_steps=config.accumulation_steps)
  described = ' '.join(f'{k}={v}' for k, v in levers.items())
  mib = ', '.join(f'{kind.removesuffix("_bytes")} {value / 2**20:,.1f} MiB' for kind, value in memory.items())
  limit = (jax.local_devices()[0].memory_stats() or {}).get('bytes_limit')  # None on CPU.
  needed = memory and memory['argument_bytes'] + memory['output_bytes'] - memory['alias_bytes'] + memory['temp_bytes']
  if not FLAGS.memory_only and limit and needed > limit:
    # Exit before running so a launcher can try more accumulation or remat at the cost of a compile, not an OOM.
    print(f'{described}: does not fit: needs {needed / 2**30:,.1f} GiB per device, has {limit / 2**30:,.1f} GiB')
    sys.exit(3)
  if FLAGS.memory_only:
    result = dict(config=os.path.basename(config_flags.get_config_filename(FLAGS['config'])),
                  backend=jax.default_backend(), devices=devices, global_batch=config.batch_size,
                  dtype=config.model.dtype, **levers, step_gflops=flops / 1e9, compile_s=compile_s,
                  memory_per_device=memory)
    print(f'{described}: per device: {mib or "no memory analysis"}')
    _append(result)
    return
  def run_steps(count):
    nonlocal state
    for _ in range(count):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)

  run_steps(FLAGS.warmup_steps)
  times = []
  for _ in range(FLAGS.steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  # Accelerators need a bigger matmul than a CPU core to reach their peak.
  if FLAGS.peak_tflops:
    peak = FLAGS.peak_tflops * 1e12 * devices
  else:
    peak = measured_matmul_peak(config.model.dtype, 2048 if jax.default_backend() == 'cpu' else 8192)
  contrastive = config.contrastive
  result = {
      'config': os.path.basename(config_flags.get_config_filename(FLAGS['config'])),
      'backend': jax.default_backend(), 'device_kind': jax.devices()[0].device_kind, 'jax': jax.__version__,
      'devices': devices, 'global_batch': config.batch_size, 'dtype': config.model.dtype,
      **levers, 'frames': FLAGS.frames, 'temporal': config.model.video.temporal if FLAGS.frames else '',
      'queue_size': contrastive.queue_size, 'kl_weight': contrastive.kl_weight,
      'filter_noisy_pairs': contrastive.filter_noisy_pairs, 'mlm_weight': config.mvlm.mlm_weight,
      'mvm_weight': config.mvlm.mvm_weight,
      'params_millions': num_params / 1e6, 'median_step_s': median,
      'p10_step_s': float(np.percentile(times, 10)), 'p90_step_s': float(np.percentile(times, 90)),
      'examples_per_s': config.batch_size / median, 'step_gflops': flops / 1e9,
      'achieved_gflops_per_s': flops / median / 1e9, 'matmul_peak_gflops_per_s': peak / 1e9,
      'fraction_of_peak': flops / median / peak, 'compile_s': compile_s,
      'memory_per_device': memory,
  }
  if FLAGS.profile_steps:
    result['op_ms_per_step_by_component'] = by_component = time_by_component(compiled, run_steps, FLAGS.profile_steps)
    total = sum(by_component.values())
    print(f'Op time per step by component ({total:,.0f} ms in all):')
    for name, ms in by_component.items():
      print(f'  {ms:8.1f} ms {100 * ms / total:5.1f}%  {name}')
  print(json.dumps(result, indent=2))
  print(f'{described}: step {median:.4f} s; per device: {mib or "no memory analysis"}')
  _append(result)


def _append(result: dict) -> None:
  if FLAGS.out:
    os.makedirs(os.path.dirname(FLAGS.out) or '.', exist_ok=True)
    with open(FLAGS.out, 'a') as f:
      f.write(json.dumps(result) + '\n')


if __name__ == '__main__':
  app.run(main)
