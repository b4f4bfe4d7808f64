r"""Named training variants x seeds at equal steps and batch: mean ± std (min-max) of recall, in one JSON.

  python benchmarks/ablations.py --sweep=mrl --config=configs/hard.py --seeds=0,1,2 \
      --root=runs/ablations/mrl --out=docs/ablations_mrl.json

Sweeps (`--sweep`; `--variants` picks a subset, in order):
  cots:       COTS components added in turn, and each alone on top of its prerequisite (clean data).
  cots_noisy: the instance/task-level variants a, b, c1, d, b+filter with --noisy_fraction swapped training captions.
  mrl:        the nested (Matryoshka) head against one full-dim loss read at a truncated prefix or through
              PCA fitted on training embeddings, and against models trained at one low dim alone.
Each run is the ordinary training job (`python -m hivlp_jax.main`) in ROOT/<variant>/seed_<s>, so a killed
sweep continues where it stopped: finished runs (metrics.json) are read back, a started one resumes from
its last checkpoint. Variants with masked vision modeling first train the visual tokenizer stage once in
ROOT/visual_tokenizer. Recall is on config.eval.split. Variants marked `project` also get, per seed,
ROOT/<variant>/seed_<s>/projections.json: exact recall of the prefix (re-normalised) and of a PCA
projection (fitted on --pca_fit_images training images and their captions) at each --dims.
"""

import dataclasses
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
flags.DEFINE_string('sweep', 'cots', 'Which named sweep: cots, cots_noisy or mrl.')
flags.DEFINE_string('config', 'configs/hard.py', 'The config every variant starts from.')
flags.DEFINE_list('seeds', ['0', '1', '2'], 'config.seed of each run of a variant.')
flags.DEFINE_list('variants', [], 'Variants to run, in order (default: all of the sweep).')
flags.DEFINE_string('root', 'runs/ablations', 'Workdirs: ROOT/<variant>/seed_<s>.')
flags.DEFINE_string('out', 'docs/ablations.json', 'JSON results.')
flags.DEFINE_integer('devices', 2, 'Simulated CPU devices (ignored on accelerators).')
flags.DEFINE_float('noisy_fraction', 0.2, 'Fraction of swapped training captions (cots_noisy).')
flags.DEFINE_list('dims', ['16', '32', '64'], 'Coarse dims of the table and of the truncation/PCA analysis.')
flags.DEFINE_integer('pca_fit_images', 5000, 'Training images (with all their captions) PCA is fitted on.')
flags.DEFINE_list('extra', [], 'More --config.x=y overrides for every run (e.g. num_train_steps=300).')

METRICS = ('i2t_r1', 'i2t_r5', 'i2t_r10', 't2i_r1', 't2i_r5', 't2i_r10', 'rsum')
QUEUE = {'contrastive.queue_size': 4096, 'contrastive.momentum': 0.99}  # 16 batches of 256.
FILTER = {'contrastive.filter_noisy_pairs': True, 'contrastive.filter_k': 1.0}
MVLM = {'mvlm.mlm_weight': 1.0, 'mvlm.mvm_weight': 1.0, 'visual_tokenizer.workdir': '{tokenizer}'}
ONE_DIM = {'loss.dim_weights': '(1.0,)', 'eval.two_stage': '()', 'eval.funnel': '()'}


def kl(weight: float) -> dict:
  return {'contrastive.kl_weight': weight, 'contrastive.kl_direction': 'symmetric'}


@dataclasses.dataclass(frozen=True)
class Variant:
  description: str
  overrides: dict
  project: bool = False  # Also measure truncation and PCA of its embeddings (projections.json).


def sweeps(full_dim: int) -> dict[str, dict[str, Variant]]:
  """Every named sweep: {sweep: {variant name: Variant}}; `full_dim` is the base config's embed_dim."""
  noisy = {'data.noisy_caption_fraction': FLAGS.noisy_fraction}
  return {
      'cots': {
          'a': Variant('in-batch contrastive', {}),
          'b': Variant('(a) + momentum queue', QUEUE),
          'c0.1': Variant('(b) + KL alignment 0.1', {**QUEUE, **kl(0.1)}),
          'c0.3': Variant('(b) + KL alignment 0.3', {**QUEUE, **kl(0.3)}),
          'c1': Variant('(b) + KL alignment 1', {**QUEUE, **kl(1.0)}),
          'd': Variant('(c1) + momentum filter', {**QUEUE, **kl(1.0), **FILTER}),
          'e': Variant('(d) + MLM + MVM', {**QUEUE, **kl(1.0), **FILTER, **MVLM}),
          'f': Variant('(e) + momentum distillation 0.4: everything', {
              **QUEUE, **kl(1.0), **FILTER, **MVLM, 'contrastive.distill_weight': 0.4}),
          'b+filter': Variant('(b) + momentum filter alone', {**QUEUE, **FILTER}),
          'a+mvlm': Variant('(a) + MLM + MVM alone', MVLM),
      },
      'cots_noisy': {
          'a': Variant('in-batch contrastive', noisy),
          'b': Variant('(a) + momentum queue', {**noisy, **QUEUE}),
          'c1': Variant('(b) + KL alignment 1', {**noisy, **QUEUE, **kl(1.0)}),
          'd': Variant('(c1) + momentum filter', {**noisy, **QUEUE, **kl(1.0), **FILTER}),
          'b+filter': Variant('(b) + momentum filter alone', {**noisy, **QUEUE, **FILTER}),
      },
      'mrl': {
          'nested': Variant('nested head, a loss at every nested dim', {}, project=True),
          'full_only': Variant('one full-dim loss', {**ONE_DIM, 'model.nested_dims': f'({full_dim},)'},
                               project=True),
          **{f'alone{d}': Variant(f'trained at dim {d} alone', {
              **ONE_DIM, 'model.embed_dim': d, 'model.nested_dims': f'({d},)'}) for d in FLAGS.dims},
      },
  }


def extra_overrides() -> dict:
  return dict(item.split('=', 1) for item in FLAGS.extra)


def run_main(workdir: str, overrides: dict, mode: str = 'train') -> None:
  """The training job (or the visual tokenizer stage) in `workdir`, resuming a started one."""
  env = dict(os.environ)
  env.setdefault('XLA_FLAGS', f'--xla_force_host_platform_device_count={FLAGS.devices}')
  command = [sys.executable, '-m', 'hivlp_jax.main', f'--mode={mode}', f'--config={FLAGS.config}',
             f'--workdir={workdir}'] + [f'--config.{k}={v}' for k, v in overrides.items()]
  print(' '.join(command[1:]), flush=True)
  subprocess.run(command, env=env, check=True)


def tokenizer_workdir() -> str:
  """Where the sweep's one visual tokenizer stage runs (for the variants with masked vision modeling)."""
  return os.path.join(FLAGS.root, 'visual_tokenizer')


def run_overrides(variant: Variant, seed: int) -> dict:
  tokenizer = tokenizer_workdir()
  overrides = {k: (v.format(tokenizer=tokenizer) if isinstance(v, str) else v) for k, v in variant.overrides.items()}
  return {**overrides, 'seed': seed, **extra_overrides()}


def train_run(variant: Variant, workdir: str, seed: int) -> dict:
  """{mode: metrics} of the run's final evaluation, training it first unless it has finished."""
  metrics_file = os.path.join(workdir, 'metrics.json')
  if not os.path.exists(metrics_file):
    tokenizer = tokenizer_workdir()
    if 'mvlm.mvm_weight' in variant.overrides and not os.path.exists(os.path.join(tokenizer, 'metrics.json')):
      run_main(tokenizer, extra_overrides(), mode='tokenizer')
    run_main(workdir, run_overrides(variant, seed))
  from hivlp_jax import evaluate  # pylint: disable=g-import-not-at-top  (jax starts only where a run needs it)
  return evaluate.read_metrics_json(metrics_file)  # Recall in percent, also of runs written in fractions.


def projection_metrics(workdir: str, dims: list[int]) -> dict:
  """{'truncate_dim{d}' | 'pca_dim{d}': metrics} of the run's final parameters (cached in projections.json)."""
  from hivlp_jax import evaluate  # pylint: disable=g-import-not-at-top  (jax starts only where a run needs it)
  path = os.path.join(workdir, 'projections.json')
  if os.path.exists(path):
    return evaluate.read_metrics_json(path)
  import flax  # pylint: disable=g-import-not-at-top
  from hivlp_jax import evaluators, gallery, retrieval, train_step  # pylint: disable=g-import-not-at-top
  from hivlp_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = gallery.config_from_workdir(workdir)
  tokenizer = pipeline.trained_run_tokenizer(config)
  model = train_step.create_model(config, tokenizer.vocab_size)
  params, _ = evaluators.restore_params(workdir, config, model)
  embed_images, embed_texts = (lambda x, f=f: f(flax.jax_utils.replicate(params), x)
                               for f in evaluators.make_pmapped_embedders(model))

  def embed(split, num_images=None):
    data = pipeline.load_split(config, split, tokenizer)
    if num_images:
      data = dataclasses.replace(data, images=data.images[:num_images], tokens=data.tokens[:num_images],
                                 captions=data.captions[:num_images])
    return evaluate.embed_split(embed_images, embed_texts, data, config.eval.batch_size)

  images, texts, text_image_ids = embed(config.eval.split)
  fit_images, fit_texts, _ = embed('train', FLAGS.pca_fit_images)
  # One projection for both towers (they share the space): the principal axes of their unit embeddings.
  fit = retrieval.normalized_prefix_np(np.concatenate([fit_images, fit_texts]), fit_images.shape[1])
  mean = fit.mean(0)
  axes = np.linalg.svd(fit - mean, full_matrices=False)[2]  # [D, D], rows by explained variance.
  results = {}
  for dim in dims:
    search = retrieval.ExactSearch(dim)
    results[f'truncate_dim{dim}'] = evaluate.retrieval_metrics(images, texts, text_image_ids, search)
    pca = lambda x: (retrieval.normalized_prefix_np(x, x.shape[1]) - mean) @ axes[:dim].T
    results[f'pca_dim{dim}'] = evaluate.retrieval_metrics(pca(images), pca(texts), text_image_ids, search)
  evaluate.write_metrics_json(path, results)
  return results


def filter_rates(workdir: str) -> dict:
  """The momentum filter's mean flag rates over the second half of training (its statistics warmed up), from
  the run's TensorBoard scalars; {} for a run without the filter."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (slow; only needed here)
  scalars = {}
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag.startswith('filter_') and value.HasField('tensor'):
          scalars.setdefault(value.tag, []).append((event.step, float(tf.make_ndarray(value.tensor))))
  last = max((step for values in scalars.values() for step, _ in values), default=0)
  return {tag: statistics.mean(v for step, v in values if step > last // 2) for tag, values in scalars.items()}


def summarise(runs: dict[str, dict]) -> dict:
  """{mode: {metric: {mean, std, min, max, n}}} over the seeds' {mode: metrics} (`runs`: seed -> them)."""
  modes = set.intersection(*(set(r) for r in runs.values())) - {'filter'}
  summary = {}
  for mode in sorted(modes):
    summary[mode] = {}
    for metric in METRICS:
      values = [r[mode][metric] for r in runs.values()]
      summary[mode][metric] = {'mean': statistics.mean(values), 'min': min(values), 'max': max(values), 'n': len(values),
                               'std': statistics.stdev(values) if len(values) > 1 else 0.0}
  return summary


def table_modes(summary: dict) -> list[str]:
  """The full dim's exact search, then exact / truncation / PCA at each --dims, and two-stage modes."""
  full = max((m for m in summary if m.startswith('exact_dim')), key=lambda m: int(m[len('exact_dim'):]))
  coarse = [f'{kind}_dim{d}' for d in FLAGS.dims for kind in ('exact', 'truncate', 'pca')]
  staged = sorted(m for m in summary if m.startswith(('two_stage', 'funnel')))
  return [full] + [m for m in coarse + staged if m in summary and m != full]


def table(results: dict) -> str:
  """Markdown: a row per variant and mode, mean ± std of each recall, RSUM with its min-max, and the RSUM
  difference from the sweep's first variant at the same mode ('>spread' where the seed ranges do not overlap)."""
  def cell(s):
    return f"{s['mean']:.1f} ± {s['std']:.1f}"
  lines = ['| variant | mode | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | RSUM (min-max) | '
           'Δ RSUM vs first |', '|' + '---|' * 10]
  baseline = next(iter(results.values()))['summary']
  for name, result in results.items():
    for mode in table_modes(result['summary']):
      s = result['summary'][mode]
      recall = ' | '.join(cell(s[m]) for m in METRICS[:-1])
      delta = '-'
      if mode in baseline and result['summary'] is not baseline:
        b = baseline[mode]['rsum']
        apart = s['rsum']['min'] > b['max'] or s['rsum']['max'] < b['min']
        delta = f"{s['rsum']['mean'] - b['mean']:+.1f}{' >spread' if apart else ''}"
      lines.append(f"| {name}: {result['description']} | {mode} | {recall} | {cell(s['rsum'])} "
                   f"({s['rsum']['min']:.1f}-{s['rsum']['max']:.1f}) | {delta} |")
  return '\n'.join(lines)


def main(argv):
  del argv
  from hivlp_jax import config_lib  # pylint: disable=g-import-not-at-top
  all_sweeps = sweeps(config_lib.load_config_file(FLAGS.config).model.embed_dim)
  if FLAGS.sweep not in all_sweeps:
    sys.exit(f'--sweep={FLAGS.sweep} is not one of {sorted(all_sweeps)}.')
  sweep = all_sweeps[FLAGS.sweep]
  names = FLAGS.variants or list(sweep)
  unknown = [n for n in names if n not in sweep]
  if unknown:
    sys.exit(f'--variants: {unknown} are not variants of sweep {FLAGS.sweep}: {sorted(sweep)}.')
  dims, seeds = [int(d) for d in FLAGS.dims], [int(s) for s in FLAGS.seeds]
  results = {}
  for name in names:
    variant, runs = sweep[name], {}
    for seed in seeds:
      workdir = os.path.join(FLAGS.root, name, f'seed_{seed}')
      print(f'[{name} seed {seed}] {variant.description}', flush=True)
      runs[seed] = train_run(variant, workdir, seed)
      if variant.project:
        runs[seed].update(projection_metrics(workdir, dims))
      if 'contrastive.filter_noisy_pairs' in variant.overrides:
        runs[seed]['filter'] = filter_rates(workdir)
    results[name] = {'description': variant.description, 'overrides': variant.overrides,
                     'runs': runs, 'summary': summarise(runs)}
  text = table(results)
  print(text)
  files.write_json(FLAGS.out, {'sweep': FLAGS.sweep, 'config': FLAGS.config, 'seeds': seeds, 'extra': FLAGS.extra,
                               'results': results, 'table': text})
  print(f'Wrote {FLAGS.out}')


if __name__ == '__main__':
  app.run(main)
