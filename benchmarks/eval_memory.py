r"""Peak memory of the retrieval evaluation: the dense [queries, gallery] path it replaced, and the top-K path.

  python benchmarks/eval_memory.py --images=5000 --captions_per_image=5 --dim=256 \
      --out=benchmarks/results/eval_memory.json

A synthetic COCO-5K-shaped test split: --images image embeddings [N, D] whose coordinate i has std
1 / (1 + i / 16) (a decaying spectrum like a Matryoshka head's), and --captions_per_image noisy copies of each
as its captions [N * captions, D] (noise std --caption_noise times each coordinate's std), so recall is
neither 0 nor 1. Every case evaluates exact search at the full dim both ways (caption queries over the
images and image queries over the captions), each in its own subprocess (this script with --case), which
reports its peak resident memory (`resource.getrusage(RUSAGE_SELF).ru_maxrss`), time and metrics:

  baseline  the imports and the embeddings only: what every case holds anyway;
  dense     the evaluator before issue 14, kept here as the reference: the [Q, G] score matrix (in JAX, as
            `ExactIndex.similarity` scored it) and a bool [Q, G] positives map, ranked in one go;
  topk      the evaluator now (`evaluate.retrieval_metrics`): query blocks of `retrieval.BLOCK_BYTES`
            scores, each reduced to its top-K and best-positive ranks (`ranking.rank_queries`).

It prints a table (peak MiB, MiB above the baseline, seconds, recall, RSUM), whether the dense and top-K
metrics are identical, and writes them all as JSON to --out.
"""

import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # The repo root.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_integer('images', 5000, 'Images in the split (COCO 5K test: 5,000).')
flags.DEFINE_integer('captions_per_image', 5, 'Captions per image (COCO: 5).')
flags.DEFINE_integer('dim', 256, 'Embedding dim, searched in full.')
flags.DEFINE_float('caption_noise', 1.5, 'Caption noise std, in units of each coordinate\'s std.')
flags.DEFINE_list('cases', ['baseline', 'dense', 'topk'], 'Cases to run, each in its own process.')
flags.DEFINE_string('case', None, 'Internal: run this one case in this process and print its JSON line.')
flags.DEFINE_string('out', 'benchmarks/results/eval_memory.json', 'JSON results.')

KS = (1, 5, 10)
CASES = ('baseline', 'dense', 'topk')


def synthetic_split(num_images: int, captions: int, dim: int, noise: float, seed: int = 0):
  """images float32 [N, D], texts float32 [N * captions, D], text_image_ids int [N * captions]."""
  rng = np.random.default_rng(seed)
  std = (1.0 / (1.0 + np.arange(dim) / 16.0)).astype(np.float32)
  images = rng.standard_normal((num_images, dim), np.float32) * std
  texts = np.repeat(images, captions, axis=0)
  texts += noise * rng.standard_normal(texts.shape, np.float32) * std
  return images, texts, np.repeat(np.arange(num_images), captions)


def dense_metrics(images: np.ndarray, texts: np.ndarray, text_image_ids: np.ndarray) -> dict:
  """The evaluator before issue 14, as it was: exact search's [Q, G] matrix and [Q, G] positives, ranked at once."""
  import jax.numpy as jnp
  from hivlp_jax.models import matryoshka
  positives_t2i = text_image_ids[:, None] == np.arange(images.shape[0])[None, :]  # [T, N]
  metrics, ranks_of = {}, {}
  for name, queries, gallery, positives in (('i2t', images, texts, positives_t2i.T),
                                            ('t2i', texts, images, positives_t2i)):
    dim = gallery.shape[1]
    q = matryoshka.normalized_prefix(jnp.asarray(queries), dim)
    g = matryoshka.normalized_prefix(jnp.asarray(gallery), dim)
    similarity = np.asarray(q @ g.T)
    best = np.max(np.where(positives & np.isfinite(similarity), similarity, -np.inf), axis=1, keepdims=True)
    ranks = np.sum((similarity >= best) & ~positives, axis=1)
    ranks_of[name] = np.where(np.isneginf(best[:, 0]), similarity.shape[1], ranks)
    metrics.update({f'{name}_r{k}': float(np.mean(ranks_of[name] < k)) for k in KS})
    del q, g, similarity, best, ranks
  metrics['rsum'] = 100.0 * sum(metrics.values())
  metrics['mean_recall'] = metrics['rsum'] / (2 * len(KS))
  metrics.update({f'{name}_medr': float(np.median(ranks + 1)) for name, ranks in ranks_of.items()})
  return metrics


def run_case(case: str) -> dict:
  """One case in this process: its peak RSS (MiB), seconds and metrics."""
  from hivlp_jax import evaluate  # Every case imports the same modules.
  from hivlp_jax import retrieval
  images, texts, ids = synthetic_split(FLAGS.images, FLAGS.captions_per_image, FLAGS.dim, FLAGS.caption_noise)
  start = time.perf_counter()
  metrics = {}
  if case == 'dense':
    metrics = dense_metrics(images, texts, ids)
  elif case == 'topk':
    metrics = evaluate.retrieval_metrics(images, texts, ids, retrieval.ExactSearch(FLAGS.dim), KS)
  return {'peak_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB.
          'seconds': time.perf_counter() - start, 'metrics': metrics}


def main(argv):
  del argv
  if FLAGS.case:
    print(json.dumps(run_case(FLAGS.case)))
    return
  unknown = sorted(set(FLAGS.cases) - set(CASES))
  if unknown:
    raise app.UsageError(f'--cases: {unknown} are not among {CASES}.')
  shape = [f'--images={FLAGS.images}', f'--captions_per_image={FLAGS.captions_per_image}', f'--dim={FLAGS.dim}',
           f'--caption_noise={FLAGS.caption_noise}']
  results = {}
  for case in FLAGS.cases:  # One at a time: a case's peak is its own.
    out = subprocess.run([sys.executable, os.path.abspath(__file__), f'--case={case}'] + shape,
                         capture_output=True, text=True, check=False)
    if out.returncode:
      sys.exit(f'Case {case} failed:\n{out.stderr[-3000:]}')
    results[case] = json.loads(out.stdout.strip().splitlines()[-1])
  base = results.get('baseline', {}).get('peak_mib', 0.0)
  print(f'{FLAGS.images} images x {FLAGS.captions_per_image} captions, D = {FLAGS.dim}; exact search, both ways')
  print(f'{"case":<10}{"peak MiB":>10}{"above base":>12}{"seconds":>9}{"i2t R@1":>9}{"t2i R@1":>9}{"RSUM":>8}')
  for case, r in results.items():
    m = r['metrics']
    recall = (f'{m["i2t_r1"]:>9.2f}{m["t2i_r1"]:>9.2f}{m["rsum"]:>8.2f}' if m else f'{"-":>9}{"-":>9}{"-":>8}')
    print(f'{case:<10}{r["peak_mib"]:>10.0f}{r["peak_mib"] - base:>12.0f}{r["seconds"]:>9.1f}' + recall)
  summary = {}
  if 'dense' in results and 'topk' in results:
    dense, topk = results['dense'], results['topk']
    summary = {'identical_metrics': dense['metrics'] == topk['metrics'],
               'peak_ratio': topk['peak_mib'] / dense['peak_mib'],
               'above_baseline_ratio': (topk['peak_mib'] - base) / max(1e-9, dense['peak_mib'] - base)}
    print(f'top-K / dense peak: {summary["peak_ratio"]:.3f} (above the baseline: '
          f'{summary["above_baseline_ratio"]:.3f}); identical metrics: {summary["identical_metrics"]}')
  from hivlp_jax import files
  files.write_json(FLAGS.out, {'command': ' '.join(['python', 'benchmarks/eval_memory.py'] + sys.argv[1:]),
                               'config': dict(images=FLAGS.images, captions_per_image=FLAGS.captions_per_image,
                                              dim=FLAGS.dim, caption_noise=FLAGS.caption_noise, ks=KS),
                               'results': results, **summary})


if __name__ == '__main__':
  app.run(main)
