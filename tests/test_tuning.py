"""Tuning a search to a recall target: the pick is the first setting of its row reaching the target, the
fastest of the rows' picks, and on real ScaNN indexes it reaches the target on held-out queries."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from hivlp_jax import coarse_to_fine
from hivlp_jax import errors
from hivlp_jax import retrieval
from hivlp_jax import tuning

EXACT = np.arange(40).reshape(4, 10)  # 4 queries, their exact top-10 ids.


def _search_finding(fraction_of):
  """A fake search: for a setting, returns each query's exact top-10 with a fraction of it replaced by
  misses (-5), so its recall@10 is `fraction_of(setting)` rounded to tenths; counts its calls."""
  calls = []

  def search(setting, queries):
    calls.append(dict(setting))
    found = int(round(10 * fraction_of(setting)))
    ids = EXACT[:len(queries)].copy()
    ids[:, found:] = -5
    time.sleep(setting.get('sleep', 0.0))
    return ids
  return search, calls


def test_the_pick_is_the_first_setting_of_a_row_to_reach_the_target_found_by_bisection():
  row = [{'n': n} for n in range(1, 11)]  # Recall n / 10.
  search, calls = _search_finding(lambda s: s['n'] / 10)
  point = tuning.cheapest_setting([row], search, np.zeros((4, 3)), EXACT, target_recall=0.7, repeats=1)
  assert point.reached and point.setting == {'n': 7} and point.recall_at_10 == pytest.approx(0.7)
  assert point.settings_tried <= 5  # Bisection: the last setting, then about log2(10) more.


def test_the_fastest_pick_of_the_rows_wins_and_an_unreachable_target_says_so():
  slow = [{'row': 0, 'n': n, 'sleep': 0.02} for n in range(1, 6)]  # Reaches 0.9 at n = 3.
  fast = [{'row': 1, 'n': n} for n in range(1, 6)]  # Reaches 0.9 at n = 5.
  search, _ = _search_finding(lambda s: min(1.0, (s['n'] + 6 - 2 * s['row']) / 10))
  point = tuning.cheapest_setting([slow, fast], search, np.zeros((4, 3)), EXACT, target_recall=0.9, repeats=2)
  assert point.setting == {'row': 1, 'n': 5} and point.reached

  search, _ = _search_finding(lambda s: s['n'] / 20)  # At most 0.25.
  point = tuning.cheapest_setting([fast], search, np.zeros((4, 3)), EXACT, target_recall=0.9, repeats=1)
  assert not point.reached and point.setting == {'row': 1, 'n': 5} and point.recall_at_10 == pytest.approx(0.2)

  with pytest.raises(errors.InputError, match=r'target_recall=1.5 must be in \(0, 1\]'):
    tuning.cheapest_setting([fast], search, np.zeros((4, 3)), EXACT, target_recall=1.5)


def _clustered(num_items, dim, num_queries, seed=0):
  """A Gaussian mixture gallery [G, D] and queries [Q, D] (noisy copies of gallery items)."""
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((64, dim)).astype(np.float32)
  gallery = centres[rng.integers(0, 64, num_items)] + 0.6 * rng.standard_normal((num_items, dim), np.float32)
  queries = gallery[rng.choice(num_items, num_queries, replace=False)]
  return gallery, queries + 0.3 * rng.standard_normal(queries.shape, np.float32)


@pytest.mark.parametrize('backend', ['rerank', 'truncate'])
def test_a_tuned_tree_reaches_the_target_on_held_out_queries_and_is_minimal_in_its_row(backend):
  gallery, queries = _clustered(20_000, 48, 400)
  tune_queries, held_out = queries[:200], queries[200:]
  settings = retrieval.ScannSettings(brute_force_below=0, threads=1)
  index = coarse_to_fine.TwoStageSearch(32, 100, settings, backend=backend).build(gallery)
  assert index.num_leaves == 141  # round(sqrt(G)).
  exact = tuning.exact_top_k(gallery, tune_queries)
  tuned, point = tuning.tune_index(index, tune_queries, exact, target_recall=0.9, repeats=1)
  assert point.reached and point.recall_at_10 >= 0.9
  assert (tuned.shortlist, tuned.leaves_to_search) == (point.setting['shortlist'],
                                                       point.setting['leaves_to_search'])
  # The row's previous leaves count misses the target: the pick is the first that reaches it.
  leaves = tuning.geometric_grid(index.num_leaves)
  previous = leaves[leaves.index(tuned.leaves_to_search) - 1] if tuned.leaves_to_search > 1 else None
  if previous is not None:
    below = index.with_knobs(tuned.shortlist, previous).search(tune_queries, 10)[1]
    assert retrieval.shortlist_recall(below, exact) < 0.9
  held_out_recall = retrieval.shortlist_recall(tuned.search(held_out, 10)[1], tuning.exact_top_k(gallery, held_out))
  assert held_out_recall >= 0.85, held_out_recall
  # Clustered data: 10 of 141 leaves (under the default 10%) already find what scanning all of them finds.
  # (Which row's pick wins is timed, so the tuned count itself is not asserted.)
  recall = lambda leaves: retrieval.shortlist_recall(index.with_knobs(1000, leaves).search(tune_queries, 10)[1], exact)
  assert recall(10) >= recall(index.num_leaves) - 0.005


def test_a_brute_force_index_tunes_its_shortlist_alone():
  gallery, queries = _clustered(3000, 48, 100)
  index = coarse_to_fine.TwoStageSearch(8, 1000).build(gallery)  # 3,000 < 20,000: brute-force coarse stage.
  assert index.num_leaves == 0
  assert tuning.index_rows(index) == [[{'shortlist': s} for s in tuning.SHORTLISTS if s <= 3000]]
  exact = tuning.exact_top_k(gallery, queries)
  tuned, point = tuning.tune_index(index, queries, exact, target_recall=0.95, repeats=1)
  assert point.reached and tuned.shortlist == point.setting['shortlist'] < 1000
  smaller = tuning.SHORTLISTS[tuning.SHORTLISTS.index(tuned.shortlist) - 1]
  assert retrieval.shortlist_recall(index.with_knobs(smaller).search(queries, 10)[1], exact) < 0.95


def test_geometric_grid():
  assert tuning.geometric_grid(10) == [1, 2, 3, 4, 7, 10]
  assert tuning.geometric_grid(1) == [1]


def test_the_retrieval_benchmark_tunes_its_rows_on_held_out_queries(tmp_path):
  """benchmarks/retrieval.py on a small clustered gallery (no FAISS rows: it is a benchmark-only
  dependency): rows with knobs carry the setting they were tuned to, and keep the recall on other queries."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / 'retrieval.json'
  subprocess.run([sys.executable, os.path.join(repo, 'benchmarks', 'retrieval.py'), '--sizes=25000', '--dim=32',
                  '--queries=200', '--tuning_queries=200', '--latency_queries=5', '--gallery=clustered',
                  '--clusters=50', '--methods=exact_numpy,scann,two_stage', '--two_stage=8:100:truncate',
                  '--target_recall=0.9', f'--out={out}', '--plot='], check=True, cwd=repo, capture_output=True)
  rows = {r['method']: r for r in json.loads(out.read_text())['results']}
  assert set(rows) == {'exact_numpy', 'scann', 'two_stage_dim8_k100_truncate'}
  assert rows['exact_numpy']['setting'] is None and rows['exact_numpy']['recall_at_10'] == 1.0
  for name in ('scann', 'two_stage_dim8_k100_truncate'):
    assert rows[name]['reached'] and rows[name]['tuning_recall'] >= 0.9, rows[name]
    assert rows[name]['recall_at_10'] >= 0.85, rows[name]  # Measured on the other 200 queries.
    assert 'leaves_to_search' in rows[name]['setting']
