r"""A gallery-scale evaluation: caption queries over a million image embeddings, through the evaluator's ranking.

  python benchmarks/gallery_eval.py --images=1000000 --queries=5000 --dim=256 \
      --out=benchmarks/results/gallery_eval.json

Synthetic embeddings as benchmarks/eval_memory.py makes them (coordinate i has std 1 / (1 + i / 16)): a
gallery of --images image embeddings [N, D] and --queries captions, noisy copies of the first --queries
images (noise std --caption_noise times each coordinate's std), each with its image as the one positive.
Each mode (exact search at the full dim, and each --two_stage coarse:shortlist) builds its index over the
whole gallery (with --target_recall, tuned first; build s includes the tuning) and ranks the captions with `ranking.rank_queries` (query blocks, top-K, best-positive
ranks: what `evaluate.retrieval_metrics` does per direction), then R@1/5/10 and the median rank. Text-to-
image only: image-to-text would make every gallery image a query.

--from_workdir=DIR evaluates trained embeddings in place of synthetic ones: the gallery is every image of
--from_split embedded by DIR's latest checkpoint, and the queries are the first caption of each of the first
--queries images. An --images larger than the split fills the gallery up with noisy copies of its images
(retrieval_data.replicated_data, --replica_noise): distractors at the scale of a web gallery, with the same
queries and positives. Prints a table and the whole run's
wall time and peak resident memory (`ru_maxrss`), and writes them as JSON to --out.
"""

import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # The repo root.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import numpy as np

from benchmarks import retrieval_data
from configs import default
from hivlp_jax import coarse_to_fine
from hivlp_jax import evaluate
from hivlp_jax import files
from hivlp_jax import ranking
from hivlp_jax import retrieval

FLAGS = flags.FLAGS
flags.DEFINE_integer('images', 1_000_000, 'Gallery size (image embeddings).')
flags.DEFINE_integer('queries', 5000, 'Caption queries, one per image of the gallery\'s first ones.')
flags.DEFINE_integer('dim', 256, 'Embedding dim (the full one; the two-stage coarse dims are prefixes).')
flags.DEFINE_float('caption_noise', 1.5, 'Caption noise std, in units of each coordinate\'s std.')
flags.DEFINE_list('two_stage', ['64:200'], 'Two-stage modes, each coarse_dim:shortlist (empty: exact only).')
flags.DEFINE_float('target_recall', 0.0, '> 0: each two-stage index is first tuned to this recall@10 of exact '
                   'search on 1,000 of the queries (evaluate.tuned_index, as config.eval.scann.target_recall).')
flags.DEFINE_string('from_workdir', '', 'A trained run whose embeddings of --from_split are the gallery and queries.')
flags.DEFINE_string('from_split', 'train', 'The split --from_workdir embeds.')
flags.DEFINE_float('replica_noise', 0.1, 'With --from_workdir: noise std of the copies, relative to each '
                   'coordinate\'s std over the split\'s images.')
flags.DEFINE_string('out', 'benchmarks/results/gallery_eval.json', 'JSON results (empty: none).')

KS = (1, 5, 10)


def main(argv):
  del argv
  start = time.perf_counter()
  if FLAGS.from_workdir:
    images, texts = retrieval_data.trained_embeddings(FLAGS.from_workdir, '', FLAGS.from_split)
    captions_per_image = len(texts) // len(images)  # A split's captions are grouped by image (embed_split).
    queries = texts[np.arange(min(FLAGS.queries, len(images))) * captions_per_image]
    if FLAGS.images > len(images):  # The first len(images) rows stay the real ones, so the positives hold.
      images, _ = retrieval_data.replicated_data(images, texts, FLAGS.images, 1, FLAGS.replica_noise, seed=0)
  else:
    rng = np.random.default_rng(0)
    std = (1.0 / (1.0 + np.arange(FLAGS.dim) / 16.0)).astype(np.float32)
    images = rng.standard_normal((FLAGS.images, FLAGS.dim), np.float32) * std
    queries = images[:FLAGS.queries] + FLAGS.caption_noise * rng.standard_normal(
        (FLAGS.queries, FLAGS.dim), np.float32) * std
  dim = images.shape[1]
  positives = np.arange(len(queries))[:, None]  # Query i's image is gallery item i.
  settings = retrieval.ScannSettings.from_config(default.get_config().eval.scann)
  modes = [retrieval.ExactSearch(dim)] + [
      coarse_to_fine.TwoStageSearch(int(d), int(k), settings) for d, k in (s.split(':') for s in FLAGS.two_stage)]
  rows = {}
  for mode in modes:
    began = time.perf_counter()
    index = mode.build(images)
    point = None
    if FLAGS.target_recall and hasattr(index, 'with_knobs'):
      index, point = evaluate.tuned_index(index, queries, images, FLAGS.target_recall)
    built = time.perf_counter()
    ranked = ranking.rank_queries(index, queries, positives, max(KS))
    rows[mode.name] = dict(build_s=built - began, rank_s=time.perf_counter() - built,
                           tuned=point.to_json() if point else None,
                           **{f't2i_r{k}': v for k, v in ranking.recall_at_k(ranked.ranks, KS).items()},
                           t2i_medr=ranking.median_rank(ranked.ranks))
    del index
  result = dict(images=len(images), queries=len(queries), dim=dim, from_workdir=FLAGS.from_workdir,
                from_split=FLAGS.from_split if FLAGS.from_workdir else '', target_recall=FLAGS.target_recall,
                replica_noise=FLAGS.replica_noise if FLAGS.from_workdir else None,
                caption_noise=0.0 if FLAGS.from_workdir else FLAGS.caption_noise, modes=rows, wall_s=time.perf_counter() - start,
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
  print(f'{"mode":<24}{"build s":>9}{"rank s":>9}{"R@1":>7}{"R@5":>7}{"R@10":>7}{"MedR":>7}')
  for name, r in rows.items():
    print(f'{name:<24}{r["build_s"]:>9.1f}{r["rank_s"]:>9.1f}{r["t2i_r1"]:>7.1f}{r["t2i_r5"]:>7.1f}'
          f'{r["t2i_r10"]:>7.1f}{r["t2i_medr"]:>7.0f}')
  print(f'G={len(images):,} Q={len(queries):,} D={dim}: whole run {result["wall_s"]:.0f} s, '
        f'peak RSS {result["peak_rss_mib"]:,.0f} MiB')
  if FLAGS.out:
    files.write_json(FLAGS.out, result)


if __name__ == '__main__':
  app.run(main)
