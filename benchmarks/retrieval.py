r"""Retrieval benchmark: exact, FAISS, ScaNN and coarse-to-fine search side by side on one gallery.

  pip install -r requirements-bench.txt  # faiss-cpu, for the FAISS rows only.
  python benchmarks/retrieval.py --sizes=10000,100000,1000000 --dim=768 --queries=1000 \
      --out=benchmarks/results/retrieval.json --plot=benchmarks/results/retrieval.png

Gallery (--gallery=uniform): G vectors whose coordinate i has std 1 / (1 + i / 16), a decaying spectrum
like a Matryoshka head's (the leading coordinates carry most of the signal). Queries: noisy copies of
random gallery items (noise std --query_noise times each coordinate's std), so the exact neighbour
structure is meaningful. --gallery=clustered: a mixture of --clusters Gaussians with that spectrum (each
--cluster_spread as wide as the centres' spread), as real embeddings cluster; IVF methods need far fewer
probes there. Ground truth: the exact full-dim cosine top-10 (the `exact_numpy` row, recall 1).

Tuned to a recall target (--target_recall, default 0.95; 0: each method's fixed default): every method
with knobs (see retrieval_methods.py: FAISS nprobe / k_factor / efSearch, ScaNN leaves and re-scoring,
the two-stage leaves and shortlist) is set to its fastest setting whose recall@10 on --tuning_queries
held-out queries reaches the target (`hivlp_jax.tuning.cheapest_setting`), then measured on --queries
others. A row whose target was not reached says so.

two_stage rows run either backend of `coarse_to_fine.TwoStageSearch`: --two_stage=64:200:rerank,64:300:truncate
puts the numpy re-rank of a ScaNN shortlist beside ScaNN's truncate mode (its exact re-scoring of the
shortlist is the second stage).

Per method and size: build time (normalisation, training and adding included), index memory (array
sizes; ScaNN's serialised size), single-query p50/p99 latency over --latency_queries queries one at a
time, batched queries/s over all queries in one call (the median of --repeats such calls), and recall@10
against the exact top-10.

Trained embeddings instead (--from_workdir=RUN, e.g. a run of configs/default.py): the gallery is the
run's --from_split image embeddings (its model's full dim; --dim is ignored) followed by copies of them
with Gaussian noise (std --replica_noise times each coordinate's std over the split's images) up to each
size; the queries are --queries of the split's caption embeddings (text-to-image, as served). The
config is the run's own (its config.json), or --config=FILE.

  python benchmarks/retrieval.py --from_workdir=runs/default --sizes=10000,100000,1000000 --queries=1000

A gallery of G items holds about G / N noisy copies of each of the N real images, so a query's exact
top-10 is mostly copies of its one or two best images and recall@10 measures how well a method orders
near-duplicates: harder for a coarse prefix than a real gallery of distinct images. Results go to
retrieval_trained.json / .png beside the synthetic ones unless --out / --plot say otherwise.

--threads=1 (the default) limits BLAS, XLA, FAISS and ScaNN to one thread each, for a like-for-like
comparison; --threads=0 lets each library use every core. Give it as --threads=N (one argument): BLAS
sizes its pool when numpy loads, before absl parses flags.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # The repo root.


def _early_threads() -> int:
  for arg in sys.argv[1:]:
    if arg.startswith('--threads='):
      return int(arg.split('=', 1)[1])
  return 1


THREADS = _early_threads()
if THREADS > 0:
  for _var in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'):
    os.environ[_var] = str(THREADS)
  if THREADS == 1:
    os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_multi_thread_eigen=false'

# pylint: disable=g-import-not-at-top,wrong-import-position
import io
import platform
import time
from typing import Optional

from absl import app
from absl import flags
from absl import logging
import numpy as np

from benchmarks import retrieval_data
from benchmarks import retrieval_methods
from hivlp_jax import coarse_to_fine
from hivlp_jax import files
from hivlp_jax import retrieval
from hivlp_jax import tuning

FLAGS = flags.FLAGS
flags.DEFINE_list('sizes', ['10000', '100000', '1000000'], 'Gallery sizes.')
flags.DEFINE_integer('dim', 768, 'Embedding dim.')
flags.DEFINE_integer('queries', 1000, 'Queries per size (batched throughput and recall).')
flags.DEFINE_integer('latency_queries', 200, 'Queries searched one at a time for p50/p99 latency.')
flags.DEFINE_float('query_noise', 0.5, 'Query noise std, relative to each coordinate\'s std.')
flags.DEFINE_integer('repeats', 1, 'Batched runs per method; queries/s is their median.')
flags.DEFINE_integer('threads', 1, 'Threads per library; 0: every core. See the module docstring.')
flags.DEFINE_list('methods', ['exact_numpy', 'exact_jax', 'faiss_flat', 'faiss_ivf', 'faiss_ivfpq', 'faiss_hnsw',
                              'scann', 'two_stage', 'funnel'], 'Methods to run.')
flags.DEFINE_enum('gallery', 'uniform', ['uniform', 'clustered'], 'Synthetic gallery: one Gaussian (uniform) or '
                  'a mixture of --clusters Gaussians (clustered, like real embeddings).')
flags.DEFINE_integer('clusters', 1000, 'clustered: mixture components.')
flags.DEFINE_float('cluster_spread', 0.5, 'clustered: each component\'s std relative to the centres\' spread.')
flags.DEFINE_float('target_recall', 0.95, 'Tune every method with knobs to its fastest setting reaching this '
                   'recall@10 on --tuning_queries held-out queries (hivlp_jax/tuning.py); 0: fixed defaults.')
flags.DEFINE_integer('tuning_queries', 500, 'Held-out queries the tuning measures recall and speed on.')
flags.DEFINE_integer('hnsw_max_size', 200_000, 'faiss_hnsw rows only up to this gallery size (its build is '
                     'single-threaded here and grows fast with G).')
flags.DEFINE_list('two_stage', ['64:1000:rerank', '16:1000:rerank', '64:300:truncate'],
                  'two_stage rows, each coarse_dim:shortlist[:backend], backend rerank, truncate or auto '
                  '(the default; see coarse_to_fine.TwoStageSearch).')
flags.DEFINE_list('funnel', ['16:1000/64:100'], 'funnel rows, each dim:shortlist/dim:shortlist/...')
flags.DEFINE_integer('scann_leaves', 0, 'ScaNN tree leaves (0: ScannSettings default, sqrt(G)).')
flags.DEFINE_integer('scann_leaves_to_search', 0, 'ScaNN leaves searched per query (0: ScannSettings default).')
flags.DEFINE_float('ivf_nprobe_fraction', 0.1, 'FAISS IVF: fraction of the sqrt(G) lists probed.')
flags.DEFINE_integer('seed', 0, 'Data seed.')
flags.DEFINE_string('out', 'benchmarks/results/retrieval.json', 'JSON results (empty: none).')
flags.DEFINE_string('plot', 'benchmarks/results/retrieval.png', 'Recall vs queries/s plot (empty: none).')
flags.DEFINE_string('from_workdir', '', 'A training run: benchmark on its model\'s embeddings (see above).')
flags.DEFINE_string('config', '', 'With --from_workdir: the run\'s config file (default: its config.json).')
flags.DEFINE_string('from_split', 'test', 'With --from_workdir: the split embedded.')
flags.DEFINE_float('replica_noise', 0.1, 'With --from_workdir: noise std of the copies, relative to each '
                   'coordinate\'s std.')

K = retrieval_methods.K


def scann_settings() -> retrieval.ScannSettings:
  return retrieval.ScannSettings(threads=THREADS, num_leaves=FLAGS.scann_leaves or None,
                                 leaves_to_search=FLAGS.scann_leaves_to_search or None)


def two_stage(spec: str) -> retrieval_methods.Method:
  """coarse_dim:shortlist[:backend] -> a TwoStageSearch row."""
  parts = spec.split(':')
  if len(parts) not in (2, 3):
    raise ValueError(f'--two_stage row {spec!r} is not coarse_dim:shortlist[:backend].')
  backend = parts[2] if len(parts) == 3 else 'auto'
  return retrieval_methods.coarse_to_fine_method(
      coarse_to_fine.TwoStageSearch(int(parts[0]), int(parts[1]), scann_settings(), backend=backend))


def methods(size: int) -> list[retrieval_methods.Method]:
  out = []
  for name in FLAGS.methods:
    if name == 'two_stage':
      out += [two_stage(spec) for spec in FLAGS.two_stage]
    elif name == 'funnel':
      out += [retrieval_methods.coarse_to_fine_method(coarse_to_fine.FunnelSearch(
          [tuple(int(x) for x in stage.split(':')) for stage in spec.split('/')], settings=scann_settings()))
              for spec in FLAGS.funnel]
    elif name == 'faiss_hnsw' and size > FLAGS.hnsw_max_size:
      logging.info('G=%d: no faiss_hnsw row (above --hnsw_max_size=%d).', size, FLAGS.hnsw_max_size)
    else:
      out.append({'exact_numpy': retrieval_methods.exact_numpy, 'exact_jax': retrieval_methods.exact_jax,
                  'faiss_flat': retrieval_methods.faiss_flat,
                  'faiss_ivf': lambda: retrieval_methods.faiss_ivf(FLAGS.ivf_nprobe_fraction),
                  'faiss_ivfpq': lambda: retrieval_methods.faiss_ivfpq(FLAGS.ivf_nprobe_fraction),
                  'faiss_hnsw': retrieval_methods.faiss_hnsw,
                  'scann': lambda: retrieval_methods.scann_full(scann_settings())}[name]())
  return out


def measure(method: retrieval_methods.Method, gallery: np.ndarray, queries: np.ndarray,
            tuning_queries: Optional[np.ndarray], tuning_top: Optional[np.ndarray]) -> tuple[dict, np.ndarray]:
  """Builds `method`'s index, tunes it to --target_recall on the tuning queries when it has knobs and
  tuning queries are given, then times it on `queries`: (the row, the ids [Q, K] it found)."""
  start = time.perf_counter()
  index = method.build(gallery)
  build_s = time.perf_counter() - start
  row = {'method': method.name, 'build_s': build_s, 'index_bytes': int(method.nbytes(index)), 'setting': None}
  setting = None
  if tuning_queries is not None and method.rows is not None and method.rows(index):
    start = time.perf_counter()
    point = tuning.cheapest_setting(method.rows(index), lambda setting, q: method.search(index, q, setting),
                                    tuning_queries, tuning_top, FLAGS.target_recall)
    setting = point.setting
    row |= {'setting': setting, 'tuning_recall': point.recall_at_10, 'reached': point.reached,
            'settings_tried': point.settings_tried, 'tune_s': time.perf_counter() - start}
  search = lambda q: method.search(index, q, setting)  # pylint: disable=unnecessary-lambda-assignment
  search(queries[:1])  # Warm-up (JAX compiles each shape once).
  search(queries[:2])
  latencies = []
  for i in range(min(FLAGS.latency_queries, len(queries))):
    start = time.perf_counter()
    search(queries[i:i + 1])
    latencies.append(time.perf_counter() - start)
  batched_s = []
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    top = search(queries)
    batched_s.append(time.perf_counter() - start)
  row |= {'p50_ms': 1e3 * float(np.percentile(latencies, 50)),
          'p99_ms': 1e3 * float(np.percentile(latencies, 99)),
          'qps': len(queries) / float(np.median(batched_s)),  # The median of --repeats batched runs.
          'qps_runs': [len(queries) / t for t in batched_s]}
  return row, np.asarray(top)


def format_table(size: int, rows: list[dict]) -> str:
  gallery = f'trained:{FLAGS.from_workdir}:{FLAGS.from_split}' if FLAGS.from_workdir else FLAGS.gallery
  lines = [f'G={size:,} D={FLAGS.dim} Q={FLAGS.queries} threads={THREADS or "all"} gallery={gallery}'
           + (f' target recall@10={FLAGS.target_recall:g}' if FLAGS.target_recall else ''),
           f'{"method":<32}{"build_s":>9}{"index_MiB":>11}{"p50_ms":>9}{"p99_ms":>9}{"qps":>10}'
           f'{"recall@10":>11}  setting']
  for r in rows:
    lines.append(f'{r["method"]:<32}{r["build_s"]:>9.2f}{r["index_bytes"] / 2**20:>11.1f}{r["p50_ms"]:>9.3f}'
                 f'{r["p99_ms"]:>9.3f}{r["qps"]:>10.0f}{r["recall_at_10"]:>11.3f}  {r["setting"] or "-"}'
                 + ('' if r.get('reached', True) else ' (target not reached)'))
  return '\n'.join(lines)


def plot(results: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import lines
  from matplotlib import patches
  import matplotlib.pyplot as plt
  names = list(dict.fromkeys(r['method'] for r in results))
  sizes = sorted({r['size'] for r in results})
  colors = plt.get_cmap('tab10')
  markers = 'osD^v<>'
  fig, ax = plt.subplots(figsize=(8, 5.5))
  for r in results:
    ax.scatter(r['qps'], r['recall_at_10'], color=colors(names.index(r['method']) % 10),
               marker=markers[sizes.index(r['size']) % len(markers)], s=50)
  handles = [patches.Patch(color=colors(i % 10), label=name) for i, name in enumerate(names)]
  handles += [lines.Line2D([], [], color='gray', marker=markers[j % len(markers)], linestyle='',
                           label=f'G={size:,}') for j, size in enumerate(sizes)]
  ax.set_xscale('log')
  ax.set_xlabel('batched queries/s (log)')
  ax.set_ylabel('recall@10 vs exact full-dim top-10')
  ax.set_title(f'D={FLAGS.dim}, {FLAGS.queries} queries, threads={THREADS or "all"}, '
               + ('trained' if FLAGS.from_workdir else FLAGS.gallery) + ' gallery'
               + (f', tuned to recall@10 {FLAGS.target_recall:g}' if FLAGS.target_recall else ''))
  ax.grid(True, which='both', alpha=0.3)
  ax.legend(handles=handles, fontsize=7, loc='lower left')
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=120)
  files.write_bytes(path, buffer.getvalue())


def main(argv):
  del argv
  if THREADS > 0 and any(m.startswith('faiss') for m in FLAGS.methods):
    import faiss
    faiss.omp_set_num_threads(THREADS)
  if FLAGS.target_recall:
    retrieval.check_target_recall(FLAGS.target_recall, '--target_recall')
  if any(m.startswith(('scann', 'two_stage', 'funnel')) for m in FLAGS.methods):
    import scann  # pylint: disable=unused-import  # Imports TensorFlow (seconds): not in a build time.
  trained = None
  if FLAGS.from_workdir:
    trained = retrieval_data.trained_embeddings(FLAGS.from_workdir, FLAGS.config, FLAGS.from_split)
    FLAGS.dim = trained[0].shape[1]  # Tables and plots show the model's dim.
    for name, suffix in (('out', '.json'), ('plot', '.png')):
      path = getattr(FLAGS, name)
      if not FLAGS[name].present and path.endswith(suffix):  # Keep the synthetic results.
        setattr(FLAGS, name, path[:-len(suffix)] + '_trained' + suffix)
  results = []
  num_tuning = FLAGS.tuning_queries if FLAGS.target_recall else 0
  for size in (int(s) for s in FLAGS.sizes):
    # One draw of queries, split: the first --queries are measured, the rest tune (held out from them).
    if trained is not None:
      gallery, queries = retrieval_data.replicated_data(*trained, size, FLAGS.queries + num_tuning,
                                                        FLAGS.replica_noise, FLAGS.seed)
    elif FLAGS.gallery == 'clustered':
      gallery, queries = retrieval_data.clustered_data(size, FLAGS.dim, FLAGS.queries + num_tuning, FLAGS.query_noise,
                                                       FLAGS.seed, FLAGS.clusters, FLAGS.cluster_spread)
    else:
      gallery, queries = retrieval_data.synthetic_data(size, FLAGS.dim, FLAGS.queries + num_tuning, FLAGS.query_noise,
                                                       FLAGS.seed)
    queries, tuning_queries = queries[:FLAGS.queries], (queries[FLAGS.queries:] if num_tuning else None)
    tuning_top = tuning.exact_top_k(gallery, tuning_queries) if num_tuning else None
    rows, tops = [], []
    for method in methods(size):
      logging.info('G=%d: %s', size, method.name)
      row, top = measure(method, gallery, queries, tuning_queries, tuning_top)
      rows.append(row)
      tops.append(top)
      print(f'  G={size} {method.name}: build {row["build_s"]:.1f} s, {row["qps"]:.0f} queries/s'
            + (f', tuned to {row["setting"]} in {row["tune_s"]:.1f} s' if 'tune_s' in row else ''), flush=True)
    # The exact_numpy row is the ground truth; without it, compute it.
    exact = next((t for r, t in zip(rows, tops) if r['method'] == 'exact_numpy'), None)
    if exact is None:
      exact = tuning.exact_top_k(gallery, queries)
    for row, top in zip(rows, tops):
      row['recall_at_10'] = retrieval.shortlist_recall(top[:, :K], exact)
    print(format_table(size, rows), flush=True)
    results += [{'size': size, **r} for r in rows]
    del gallery, queries

  config = {'dim': FLAGS.dim, 'queries': FLAGS.queries, 'latency_queries': FLAGS.latency_queries,
            'query_noise': FLAGS.query_noise, 'threads': THREADS, 'repeats': FLAGS.repeats, 'seed': FLAGS.seed,
            'k': K, 'two_stage': FLAGS.two_stage, 'funnel': FLAGS.funnel,
            'ivf_nprobe_fraction': FLAGS.ivf_nprobe_fraction, 'cpu_count': os.cpu_count(),
            'gallery': FLAGS.gallery, 'clusters': FLAGS.clusters, 'cluster_spread': FLAGS.cluster_spread,
            'target_recall': FLAGS.target_recall, 'tuning_queries': num_tuning,
            'data': f'trained:{FLAGS.from_workdir}:{FLAGS.from_split}' if trained is not None else 'synthetic',
            'replica_noise': FLAGS.replica_noise if trained is not None else None,
            'machine': platform.machine(), 'python': platform.python_version()}
  if FLAGS.out:
    files.write_json(FLAGS.out, {'config': config, 'results': results})
  if FLAGS.plot:
    plot(results, FLAGS.plot)


if __name__ == '__main__':
  app.run(main)
