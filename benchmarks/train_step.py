r"""Benchmark of the pmapped train step: median step time, examples/s, FLOP utilisation and memory per device.

  XLA_FLAGS=--xla_force_host_platform_device_count=1 python benchmarks/train_step.py \
      --config=configs/default.py --steps=20 --out=benchmarks/results/train_step.json
The memory levers are config fields: add --config.model.remat=block (or block_full),
--config.model.scan_layers=True and/or --config.accumulation_steps=K to make a table of memory against step
time; --memory_only compiles without running (the accumulation table of docs/results.md).

Synthetic batches of the config's shapes, so the number is the step alone (no input pipeline); with
masked vision-language modeling on, masked inputs and random visual-token ids. FLOPs are
XLA's cost analysis of the compiled step (forward, backward and optimizer, summed over devices); the peak is
a measured matmul in the model's dtype on the same devices. Memory is XLA's memory analysis of the compiled
step on one device (pmap compiles one program per device): arguments (state, batch), outputs, temporaries
(the activations kept for the backward pass live here), and the outputs aliased to donated arguments.
"""

import json
import os
import statistics
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

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/default.py', 'Config to benchmark.')
flags.DEFINE_integer('steps', 20, 'Timed steps after 3 warm-up steps.')
flags.DEFINE_integer('vocab_size', 1000, 'Vocabulary size of the text tower.')
flags.DEFINE_string('out', '', 'Append the result as one JSON line to this file.')
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
  # hands to cuBLAS (an H200 run of base_b16 counted 3.7 TFLOP per step, a tenth of an analytic count).
  analysis = lowered.cost_analysis()
  if isinstance(analysis, list):
    analysis = analysis[0]
  return float(analysis.get('flops', float('nan'))) if analysis else float('nan')


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
  batch = {
      'image': rng.integers(0, 256, (config.batch_size, size, size, 3), dtype=np.uint8),
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
  lowered = p_step.lower(state, batch)
  flops = step_flops(lowered) * devices
  memory = memory_per_device(lowered.compile())
  levers = dict(remat=config.model.remat, scan_layers=config.model.scan_layers,
                accumulation_steps=config.accumulation_steps)
  described = ' '.join(f'{k}={v}' for k, v in levers.items())
  mib = ', '.join(f'{kind.removesuffix("_bytes")} {value / 2**20:,.1f} MiB' for kind, value in memory.items())
  if FLAGS.memory_only:
    result = dict(config=os.path.basename(config_flags.get_config_filename(FLAGS['config'])),
                  backend=jax.default_backend(), devices=devices, global_batch=config.batch_size,
                  dtype=config.model.dtype, **levers, step_gflops=flops / 1e9, memory_per_device=memory)
    print(f'{described}: per device: {mib or "no memory analysis"}')
    _append(result)
    return
  for _ in range(3):
    state, metrics = p_step(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(FLAGS.steps):
    start = time.perf_counter()
    state, metrics = p_step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  # Accelerators need a bigger matmul than a CPU core to reach their peak.
  peak = measured_matmul_peak(config.model.dtype, 2048 if jax.default_backend() == 'cpu' else 8192)
  contrastive = config.contrastive
  result = {
      'config': os.path.basename(config_flags.get_config_filename(FLAGS['config'])),
      'backend': jax.default_backend(), 'device_kind': jax.devices()[0].device_kind, 'jax': jax.__version__,
      'devices': devices, 'global_batch': config.batch_size, 'dtype': config.model.dtype,
      **levers,
      'queue_size': contrastive.queue_size, 'kl_weight': contrastive.kl_weight,
      'filter_noisy_pairs': contrastive.filter_noisy_pairs, 'mlm_weight': config.mvlm.mlm_weight,
      'mvm_weight': config.mvlm.mvm_weight,
      'params_millions': num_params / 1e6, 'median_step_s': median,
      'p10_step_s': float(np.percentile(times, 10)), 'p90_step_s': float(np.percentile(times, 90)),
      'examples_per_s': config.batch_size / median, 'step_gflops': flops / 1e9,
      'achieved_gflops_per_s': flops / median / 1e9, 'matmul_peak_gflops_per_s': peak / 1e9,
      'fraction_of_peak': flops / median / peak,
      'memory_per_device': memory,
  }
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
