"""Coarse-to-fine retrieval and saved indexes, on real ScaNN (CPU, small galleries)."""

import json
import logging
import os

import numpy as np
import pytest

from hivlp_jax import evaluate
from hivlp_jax import index_store
from hivlp_jax import retrieval

# Every leaf searched and every candidate re-scored: the tree path, but exhaustive.
EXHAUSTIVE_TREE = retrieval.ScannSettings(brute_force_below=0, num_leaves=8, leaves_to_search=8,
                                          reorder=10_000)


def decaying_embeddings(num_items, dim, seed=0, num_queries=0, noise=0.5):
  """Gallery [G, D] with std 1 / (1 + i / 16) on coordinate i, and queries that are noisy gallery copies."""
  rng = np.random.default_rng(seed)
  std = (1.0 / (1.0 + np.arange(dim) / 16.0)).astype(np.float32)
  gallery = rng.standard_normal((num_items, dim), np.float32) * std
  sources = rng.integers(0, num_items, num_queries)
  queries = gallery[sources] + noise * rng.standard_normal((num_queries, dim), np.float32) * std
  return gallery, queries


def assert_matches_exact(similarity, queries, gallery):
  exact = retrieval.ExactSearch(gallery.shape[1]).similarity(queries, gallery)
  assert np.all(np.isfinite(similarity))
  np.testing.assert_allclose(similarity, exact, atol=1e-5)


@pytest.mark.parametrize('settings', [None, EXHAUSTIVE_TREE], ids=['brute_force', 'tree'])
def test_two_stage_equals_exact_when_shortlist_covers_gallery(settings):
  gallery, queries = decaying_embeddings(400, 64, num_queries=20)
  mode = retrieval.TwoStageSearch(coarse_dim=8, shortlist=400, settings=settings)
  assert_matches_exact(mode.similarity(queries, gallery), queries, gallery)
  # Scores, not indices: equal scores may come back in either order.
  scores, indices = mode.search(queries, gallery, k=10)
  exact_scores, _ = retrieval.exact_top_k(queries, gallery, 10)
  np.testing.assert_allclose(scores, exact_scores, atol=1e-5)
  q, g = retrieval.normalized_prefix_np(queries, 64), retrieval.normalized_prefix_np(gallery, 64)
  np.testing.assert_allclose(np.sum(q[:, None] * g[indices], axis=-1), scores, atol=1e-5)


def test_two_stage_recall_with_small_shortlist():
  gallery, queries = decaying_embeddings(4000, 128, num_queries=100)
  _, exact_top10 = retrieval.exact_top_k(queries, gallery, 10)
  # Brute force, and tree + AH scanning half the leaves (measured: 0.986 of the exact top-10 kept).
  for settings in (None, retrieval.ScannSettings(brute_force_below=0, num_leaves=40, leaves_to_search=20)):
    index = retrieval.TwoStageSearch(32, 200, settings).build(gallery)
    _, candidates = index.candidates(queries)
    assert candidates.shape == (100, 200)
    assert retrieval.shortlist_recall(candidates, exact_top10) >= 0.95
    _, top10 = index.search(queries, 10)
    assert retrieval.shortlist_recall(top10, exact_top10) >= 0.95
    # The shortlist holds 5% of the gallery, the rest scores -inf.
    similarity = index.similarity(queries[:5])
    assert np.all(np.isfinite(similarity).sum(axis=1) == 200)


def test_funnel_equals_exact_when_shortlists_cover_gallery():
  gallery, queries = decaying_embeddings(300, 64, num_queries=20)
  mode = retrieval.FunnelSearch(stages=((8, 300), (16, 300), (32, 300)))
  assert_matches_exact(mode.similarity(queries, gallery), queries, gallery)


def test_funnel_shrinks_shortlist_and_ranks_at_final_dim():
  gallery, queries = decaying_embeddings(1000, 64, num_queries=10)
  index = retrieval.FunnelSearch(stages=((8, 500), (16, 50)), final_dim=48).build(gallery)
  scores, candidates = index.candidates(queries)
  assert candidates.shape == (10, 50)
  expected = np.sum(retrieval.normalized_prefix_np(queries, 48)[:, None]
                    * retrieval.normalized_prefix_np(gallery, 48)[candidates], axis=-1)
  np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_scann_prefix_mode_equals_exact_when_exhaustive():
  gallery, queries = decaying_embeddings(400, 64, num_queries=20)
  mode = retrieval.ScannPrefixSearch(dim=16, shortlist=400, settings=EXHAUSTIVE_TREE)
  assert_matches_exact(mode.similarity(queries, gallery), queries, gallery)


def test_two_stage_plugs_into_the_evaluator():
  gallery, queries = decaying_embeddings(200, 32, num_queries=200, noise=0.3)
  ids = np.arange(200)
  exact = evaluate.retrieval_metrics(gallery, queries, ids, retrieval.ExactSearch(32))
  two_stage = evaluate.retrieval_metrics(gallery, queries, ids, retrieval.TwoStageSearch(8, 200))
  assert two_stage == pytest.approx(exact)


def test_shortlist_recall_hand_built():
  candidates = np.array([[0, 1, 2, 3], [9, 8, -1, -1]])
  exact = np.array([[3, 4], [8, 7]])
  # Query 0 finds 3 of {3, 4}; query 1 finds 8 of {8, 7}: 2 of 4.
  assert retrieval.shortlist_recall(candidates, exact) == pytest.approx(0.5)
  assert retrieval.shortlist_recall(exact, exact) == 1.0


def test_scann_search_pads_what_a_tree_does_not_find():
  gallery, queries = decaying_embeddings(1000, 16, num_queries=3)
  settings = retrieval.ScannSettings(brute_force_below=0, num_leaves=20, leaves_to_search=1, reorder=50)
  searcher = retrieval.build_scann(retrieval.normalized_prefix_np(gallery, 16), 10, settings)
  scores, indices = retrieval.scann_search(searcher, retrieval.normalized_prefix_np(queries, 16), 500)
  assert scores.shape == indices.shape == (3, 500)
  assert np.all((indices == -1) == np.isneginf(scores))
  assert np.any(indices == -1)  # One leaf of ~50 items cannot fill 500 slots.


def test_scann_serialize_round_trip(tmp_path):
  gallery, queries = decaying_embeddings(2000, 32, num_queries=20)
  database = retrieval.normalized_prefix_np(gallery, 32)
  q = retrieval.normalized_prefix_np(queries, 32)
  searcher = retrieval.build_scann(database, 10, retrieval.ScannSettings(brute_force_below=0))
  searcher.serialize(str(tmp_path), relative_path=True)
  import scann  # pylint: disable=g-import-not-at-top
  loaded = scann.scann_ops_pybind.load_searcher(str(tmp_path))
  # Serial search on both: a fresh searcher's parallel search may pick other approximate neighbours.
  before = retrieval.scann_search(searcher, q, 10, threads=1)
  after = retrieval.scann_search(loaded, q, 10, threads=1)
  np.testing.assert_allclose(after[0], before[0], atol=1e-6)


def test_load_or_build_reuses_and_detects_stale_index(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  gallery, queries = decaying_embeddings(1500, 32, num_queries=10)
  directory = str(tmp_path / 'index')
  settings = retrieval.ScannSettings(brute_force_below=0)
  kwargs = dict(coarse_dim=8, shortlist=100, settings=settings)

  first = index_store.load_or_build(directory, gallery, step=100, **kwargs)
  assert first.rebuilt
  with open(os.path.join(directory, index_store.MANIFEST)) as f:
    manifest = json.load(f)
  assert manifest['step'] == 100 and manifest['coarse_dim'] == 8 and manifest['shape'] == [1500, 32]
  assert manifest['fingerprint'] == retrieval.fingerprint(gallery)

  again = index_store.load_or_build(directory, gallery, step=100, **kwargs)
  assert not again.rebuilt
  np.testing.assert_array_equal(again.embeddings, gallery)
  # Serial search (threads=1) on both, as in the round-trip test.
  fresh, reloaded = [
      retrieval.CoarseToFineIndex(s.embeddings, ((8, 100),), 32, s.searcher, threads=1).search(queries, 10)
      for s in (first, again)]
  np.testing.assert_allclose(reloaded[0], fresh[0], atol=1e-6)

  caplog.clear()
  newer = index_store.load_or_build(directory, gallery, step=200, **kwargs)
  assert newer.rebuilt and 'stale' in caplog.text and 'step' in caplog.text
  assert index_store.read_manifest(directory)['step'] == 200

  caplog.clear()
  changed = gallery.copy()
  changed[0, 0] += 1.0
  rebuilt = index_store.load_or_build(directory, changed, step=200, **kwargs)
  assert rebuilt.rebuilt and 'fingerprint' in caplog.text
  np.testing.assert_array_equal(index_store.load(directory).embeddings, changed)
  assert not [p for p in os.listdir(tmp_path) if p != 'index']  # No temporary directories left.
