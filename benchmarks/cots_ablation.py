r"""COTS instance/task-level ablation on the embedded default with noisy (swapped) captions.

  python benchmarks/cots_ablation.py --root=runs/cots_ablation --out=docs/cots_ablation.json

Trains configs/default.py four times with the same steps, batch, seed and data (a fraction of the
training images carry another image's captions), one variant at a time:
  a: in-batch contrastive;  b: + momentum queue;  c: + KL alignment;  d: + adaptive momentum filter.
Each run is the ordinary training job (`python -m hivlp_jax.main`) in its own workdir, so an interrupted
ablation resumes where it stopped. Then it reads every run's metrics.json (R@1/5/10 both ways at each
nested dim) and TensorBoard scalars (examples/s, the filter's flag rates), prints a markdown table and
writes JSON. Recall is on the clean test split.
"""

import glob
import os
import statistics
import subprocess
import sys

from absl import app
from absl import flags
import numpy as np

from hivlp_jax import files

FLAGS = flags.FLAGS
flags.DEFINE_string('root', 'runs/cots_ablation', 'One workdir per variant is made under this folder.')
flags.DEFINE_string('out', 'docs/cots_ablation.json', 'JSON results.')
flags.DEFINE_list('variants', ['a', 'b', 'c', 'd'], 'Which variants to run, in order.')
flags.DEFINE_integer('devices', 2, 'Simulated CPU devices (ignored on accelerators).')
flags.DEFINE_float('noisy_fraction', 0.2, 'Fraction of training images whose captions are swapped.')
flags.DEFINE_integer('queue_size', 4096, 'Pairs per queue (a multiple of the batch of 256).')
# The EMA time constant 1 / (1 - m) = 100 steps is small next to the 700 steps of the default run;
# ALBEF's 0.995 (200 steps) lags a quarter of it.
flags.DEFINE_float('momentum', 0.99, 'EMA momentum of the momentum towers.')
flags.DEFINE_float('kl_weight', 1.0, 'Weight of the symmetric KL alignment (variants c, d).')
# With 20% noise the score distribution is a mixture: the noisy mode widens the std, so mean - 2 std falls
# below most noisy pairs; mean - 1 std sits between the modes.
flags.DEFINE_float('filter_k', 1.0, 'Threshold mean - k * std of the filter (variant d).')
flags.DEFINE_list('extra', [], 'More --config.x=y overrides for every variant (e.g. num_train_steps=300).')

VARIANTS = {
    'a': 'in-batch contrastive',
    'b': '+ momentum queue',
    'c': '+ KL alignment',
    'd': '+ adaptive momentum filter',
}


def overrides(variant: str) -> dict:
  config = {'data.noisy_caption_fraction': FLAGS.noisy_fraction}
  if variant >= 'b':
    config.update({'contrastive.queue_size': FLAGS.queue_size, 'contrastive.momentum': FLAGS.momentum})
  if variant >= 'c':
    config.update({'contrastive.kl_weight': FLAGS.kl_weight, 'contrastive.kl_direction': 'symmetric'})
  if variant >= 'd':
    config.update({'contrastive.filter_noisy_pairs': True, 'contrastive.filter_k': FLAGS.filter_k})
  for item in FLAGS.extra:
    key, value = item.split('=', 1)
    config[key] = value
  return config


def run_variant(variant: str) -> str:
  workdir = os.path.join(FLAGS.root, variant)
  if os.path.exists(os.path.join(workdir, 'metrics.json')):
    print(f'[{variant}] done before: {workdir}', flush=True)
    return workdir
  env = dict(os.environ)
  env.setdefault('XLA_FLAGS', f'--xla_force_host_platform_device_count={FLAGS.devices}')
  command = [sys.executable, '-m', 'hivlp_jax.main', '--config=configs/default.py', f'--workdir={workdir}']
  command += [f'--config.{k}={v}' for k, v in overrides(variant).items()]
  print(f'[{variant}] {VARIANTS[variant]}: {" ".join(command[1:])}', flush=True)
  subprocess.run(command, env=env, check=True)
  return workdir


def read_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """Every scalar of the run's TensorBoard event files: {tag: [(step, value), ...]}."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (slow; only needed here)
  scalars = {}
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        number = tf.make_ndarray(value.tensor) if value.HasField('tensor') else value.simple_value
        if np.ndim(number) == 0 and np.asarray(number).dtype.kind == 'f':  # Not text or hparams.
          scalars.setdefault(value.tag, []).append((event.step, float(number)))
  return scalars


def summarise(variant: str, workdir: str) -> dict:
  metrics = files.read_json(os.path.join(workdir, 'metrics.json'))
  scalars = read_scalars(workdir)
  last_step = max(step for step, _ in scalars['loss'])
  # Rates after the filter's statistics have warmed up: the second half of training.
  late = lambda tag: [v for step, v in scalars.get(tag, []) if step > last_step // 2]
  result = {'variant': variant, 'name': VARIANTS[variant], 'overrides': overrides(variant), 'steps': last_step,
            'examples_per_sec_median': statistics.median(late('examples_per_sec')),
            'recall': {mode: values for mode, values in metrics.items() if mode != 'step'}}
  if 'filter_flagged_noisy' in scalars:
    result['filter_flagged_noisy'] = statistics.mean(late('filter_flagged_noisy'))
    result['filter_dropped_clean'] = statistics.mean(late('filter_dropped_clean'))
    result['filter_dropped_fraction'] = statistics.mean(late('filter_dropped_fraction'))
  return result


def table(results: list[dict]) -> str:
  dims = sorted(int(m[len('exact_dim'):]) for m in results[0]['recall'] if m.startswith('exact_dim'))
  # The full dim, and the coarse dim that the default two-stage mode shortlists with.
  full, coarse = f'exact_dim{dims[-1]}', f'exact_dim{dims[1] if len(dims) > 2 else dims[0]}'
  lines = ['| variant | mode | i2t R@1/5/10 | t2i R@1/5/10 | RSUM | ex/s | noisy flagged | clean dropped |',
           '|---|---|---|---|---|---|---|---|']
  for r in results:
    for mode in (full, coarse):
      m = r['recall'][mode]
      i2t = '/'.join(f"{m[f'i2t_r{k}']:.3f}" for k in (1, 5, 10))
      t2i = '/'.join(f"{m[f't2i_r{k}']:.3f}" for k in (1, 5, 10))
      flagged = f"{r['filter_flagged_noisy']:.3f}" if 'filter_flagged_noisy' in r else '-'
      clean = f"{r['filter_dropped_clean']:.3f}" if 'filter_dropped_clean' in r else '-'
      lines.append(f"| ({r['variant']}) {r['name']} | {mode} | {i2t} | {t2i} | {m['rsum']:.1f} | "
                   f"{r['examples_per_sec_median']:.0f} | {flagged} | {clean} |")
  return '\n'.join(lines)


def main(argv):
  del argv
  results = [summarise(v, run_variant(v)) for v in FLAGS.variants]
  print(table(results))
  files.write_json(FLAGS.out, {'noisy_fraction': FLAGS.noisy_fraction, 'results': results, 'table': table(results)})
  print(f'Wrote {FLAGS.out}')


if __name__ == '__main__':
  app.run(main)
