"""Coarse-to-fine retrieval and saved indexes, on real ScaNN (CPU, small galleries)."""

import json
import logging
import os

import ml_collections
import numpy as np
import pytest

from configs import default
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


@pytest.mark.parametrize('settings,backend,index_type', [
    (None, 'auto', retrieval.CoarseToFineIndex),  # 400 items: below the brute-force threshold.
    (EXHAUSTIVE_TREE, 'rerank', retrieval.CoarseToFineIndex),
    (EXHAUSTIVE_TREE, 'truncate', retrieval.ScannPrefixIndex),
], ids=['brute_force', 'rerank_tree', 'truncate_tree'])
def test_two_stage_equals_exact_when_shortlist_covers_gallery(settings, backend, index_type):
  gallery, queries = decaying_embeddings(400, 64, num_queries=20)
  mode = retrieval.TwoStageSearch(coarse_dim=8, shortlist=400, settings=settings, backend=backend)
  assert isinstance(mode.index(gallery), index_type)
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
  # Brute force, and tree + AH scanning half the leaves, re-ranked by hand or by ScaNN's truncate mode
  # (measured: 1.0, 0.98 and 0.982 of the exact top-10 kept).
  half_tree = retrieval.ScannSettings(brute_force_below=0, num_leaves=40, leaves_to_search=20)
  for settings, backend in ((None, 'rerank'), (half_tree, 'rerank'), (half_tree, 'truncate')):
    index = retrieval.TwoStageSearch(32, 200, settings, backend=backend).build(gallery)
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
  assert mode.backend == 'truncate' and mode.name == 'scann_prefix16_k400'
  assert_matches_exact(mode.similarity(queries, gallery), queries, gallery)


@pytest.mark.parametrize('final_dim', [None, 48])
def test_truncate_backend_equals_exact_search_when_exhaustive(final_dim):
  """Stage 1 (tree + AH on the 8-prefix) keeps every item, stage 2 is ScaNN's exact re-scoring: the
  exact top-k by the cosine of the normalised `final_dim`-prefixes."""
  gallery, queries = decaying_embeddings(400, 64, num_queries=20)
  mode = retrieval.TwoStageSearch(8, 400, EXHAUSTIVE_TREE, final_dim=final_dim, backend='truncate')
  index = mode.build(gallery)
  assert isinstance(index, retrieval.ScannPrefixIndex) and index.shortlist == 400
  dim = final_dim or 64
  exact_scores, _ = retrieval.exact_top_k(queries, gallery, 400, dim=dim)
  scores, indices = index.search(queries, 10)
  np.testing.assert_allclose(scores, exact_scores[:, :10], atol=1e-5)
  q, g = retrieval.normalized_prefix_np(queries, dim), retrieval.normalized_prefix_np(gallery, dim)
  np.testing.assert_allclose(np.sum(q[:, None] * g[indices], axis=-1), scores, atol=1e-5)
  # The stage-1 shortlist, with its stage-2 scores: here the whole gallery.
  candidate_scores, candidates = index.candidates(queries)
  assert candidates.shape == (20, 400)
  assert all(set(row) == set(range(400)) for row in candidates)
  np.testing.assert_allclose(np.sort(candidate_scores, axis=1)[:, ::-1], exact_scores, atol=1e-5)
  # More neighbours than the shortlist: padded as the rerank backend pads.
  small = retrieval.TwoStageSearch(8, 5, EXHAUSTIVE_TREE, backend='truncate').build(gallery)
  scores, indices = small.search(queries, 8)
  assert np.all(np.isfinite(scores[:, :5])) and np.all(np.isneginf(scores[:, 5:]))
  assert np.all(indices[:, 5:] == -1)


def test_auto_backend_follows_the_brute_force_threshold():
  gallery, queries = decaying_embeddings(600, 32, num_queries=5)
  settings = retrieval.ScannSettings(brute_force_below=500)
  mode = retrieval.TwoStageSearch(8, 50, settings)
  assert mode.backend == 'auto' and mode.name == 'two_stage_dim8_k50'
  assert mode.resolve_backend(600) == 'truncate' and mode.resolve_backend(499) == 'rerank'
  large, small = mode.build(gallery), mode.build(gallery[:400])
  assert isinstance(large, retrieval.ScannPrefixIndex) and isinstance(small, retrieval.CoarseToFineIndex)
  assert mode.scann_settings(600).num_leaves > 0 and mode.scann_settings(600).reorder == 50
  assert mode.scann_settings(400).num_leaves == 0  # Brute force.
  for index in (large, small):
    assert index.search(queries, 10)[1].shape == (5, 10)
  # A fixed backend ignores the gallery's size, and says so in the name.
  assert isinstance(retrieval.TwoStageSearch(8, 50, settings, backend='rerank').build(gallery),
                    retrieval.CoarseToFineIndex)
  assert isinstance(retrieval.TwoStageSearch(8, 50, settings, backend='truncate').build(gallery[:400]),
                    retrieval.ScannPrefixIndex)
  assert retrieval.TwoStageSearch(64, 1000, backend='rerank').name == 'two_stage_dim64_k1000_rerank'
  assert retrieval.TwoStageSearch(64, 1000, backend='truncate').name == 'two_stage_dim64_k1000_truncate'
  with pytest.raises(ValueError, match='backend'):
    retrieval.TwoStageSearch(8, 50, backend='scann')


def test_modes_from_config_pass_the_backend():
  config = ml_collections.ConfigDict({'model': {'nested_dims': (8, 32)},
                                      'eval': {'two_stage': ((8, 50),), 'funnel': (), 'two_stage_backend': 'auto',
                                               'scann': default.get_config().eval.scann}})
  modes = evaluate.modes_from_config(config)
  assert [m.name for m in modes] == ['exact_dim8', 'exact_dim32', 'two_stage_dim8_k50']
  assert modes[-1].backend == 'auto'
  assert evaluate.modes_from_config(config, 'truncate')[-1].name == 'two_stage_dim8_k50_truncate'
  config.eval.two_stage_backend = 'rerank'
  assert evaluate.modes_from_config(config)[-1].backend == 'rerank'
  # config.eval.scann reaches the searchers; 0 fields are resolved from the gallery size.
  config.eval.scann.update(num_leaves=7, brute_force_below=100)
  settings = evaluate.modes_from_config(config)[-1].scann_settings(400)
  assert (settings.num_leaves, settings.training_sample_size) == (7, 400)
  config.eval.scann.reorder = -1
  with pytest.raises(ValueError, match=r'config.eval.scann.reorder=-1 must be >= 0'):
    evaluate.modes_from_config(config)


def test_speed_metrics_time_each_mode_and_measure_the_shortlist():
  gallery, queries = decaying_embeddings(300, 32, num_queries=40, noise=0.3)
  exact_top = retrieval.exact_top_k(queries, gallery, 10)[1]
  # Below the brute-force threshold stage 1 is the exact dim-8 top-20, so its recall of the full-dim top-10
  # is the overlap of two exact top lists, counted here with sets.
  coarse_top = retrieval.exact_top_k(queries, gallery, 20, dim=8)[1]
  expected = np.mean([len(set(c) & set(e)) / 10 for c, e in zip(coarse_top, exact_top)])
  assert 0.3 < expected < 1.0  # A case where the figure is neither trivial value.
  rerank = evaluate.speed_metrics(queries, gallery, retrieval.TwoStageSearch(8, 20, backend='rerank'), exact_top,
                                  latency_queries=10)
  assert rerank['shortlist_recall'] == pytest.approx(expected)
  assert 0 < rerank['stage1_p50_ms'] and 0 < rerank['p50_ms'] <= rerank['p99_ms'] and rerank['queries_per_s'] > 0
  truncate = evaluate.speed_metrics(queries, gallery, retrieval.TwoStageSearch(
      8, 300, settings=EXHAUSTIVE_TREE, backend='truncate'), exact_top, latency_queries=10)
  assert truncate['shortlist_recall'] == 1.0 and 'stage1_p50_ms' not in truncate  # One ScaNN call, whole gallery.
  exact = evaluate.speed_metrics(queries, gallery, retrieval.ExactSearch(32), exact_top, latency_queries=10)
  assert set(exact) == {'p50_ms', 'p99_ms', 'queries_per_s'}
  results = evaluate.evaluate(gallery, queries, np.arange(40) % 300, [retrieval.ExactSearch(32)], (1, 5, 10),
                              latency_queries=5)
  assert {'t2i_p50_ms', 'i2t_queries_per_s', 'rsum'} <= set(results['exact_dim32'])
  assert 'text-to-image speed' in evaluate.format_table(results, (1, 5, 10))


def test_two_stage_plugs_into_the_evaluator():
  gallery, queries = decaying_embeddings(200, 32, num_queries=200, noise=0.3)
  ids = np.arange(200)
  exact = evaluate.retrieval_metrics(gallery, queries, ids, retrieval.ExactSearch(32))
  two_stage = evaluate.retrieval_metrics(gallery, queries, ids, retrieval.TwoStageSearch(8, 200))
  assert two_stage == pytest.approx(exact)
  truncate = retrieval.TwoStageSearch(8, 200, EXHAUSTIVE_TREE, backend='truncate')
  assert evaluate.retrieval_metrics(gallery, queries, ids, truncate) == pytest.approx(exact)


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
  kwargs = dict(coarse_dim=8, shortlist=100, settings=settings, backend='rerank')

  first = index_store.load_or_build(directory, gallery, step=100, **kwargs)
  assert first.rebuilt
  with open(os.path.join(directory, index_store.MANIFEST)) as f:
    manifest = json.load(f)
  assert manifest['step'] == 100 and manifest['coarse_dim'] == 8 and manifest['shape'] == [1500, 32]
  assert manifest['backend'] == 'rerank' and first.backend == 'rerank'
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


def _serial_search(stored, queries, k=10):
  """Serial search (threads=1), as in the round-trip test."""
  return stored.index(threads=1).search(queries, k)


def test_truncate_index_round_trip_and_backend_change(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  gallery, queries = decaying_embeddings(1000, 32, num_queries=10)
  directory = str(tmp_path / 'index')
  settings = retrieval.ScannSettings(brute_force_below=500)  # 'auto' is 'truncate' at 1,000 items.
  kwargs = dict(coarse_dim=8, shortlist=100, settings=settings)

  first = index_store.load_or_build(directory, gallery, step=1, **kwargs)
  assert first.rebuilt and first.backend == 'truncate'
  assert index_store.read_manifest(directory)['backend'] == 'truncate'
  assert isinstance(first.index(), retrieval.ScannPrefixIndex)
  again = index_store.load_or_build(directory, gallery, step=1, **kwargs, backend='truncate')
  assert not again.rebuilt and again.backend == 'truncate'
  # Scores, not indices: equal scores may come back in either order.
  fresh, reloaded = _serial_search(first, queries), _serial_search(again, queries)
  np.testing.assert_allclose(reloaded[0], fresh[0], atol=1e-6)
  exact_scores, _ = retrieval.exact_top_k(queries, gallery, 10)
  # The noisy copy's source comes first for most queries; hashing the 8-d prefix can miss one now and then
  # (about 1 query in 130 in repeated runs: ScaNN's training is not seeded).
  assert np.mean(np.isclose(reloaded[0][:, 0], exact_scores[:, 0], atol=1e-5)) >= 0.8

  # The other backend is stale: rebuilt (and back).
  caplog.clear()
  rerank = index_store.load_or_build(directory, gallery, step=1, **kwargs, backend='rerank')
  assert rerank.rebuilt and rerank.backend == 'rerank'
  assert any(r.startswith("backend: saved 'truncate'") for r in rerank.stale_reasons), rerank.stale_reasons
  assert 'stale' in caplog.text and 'backend' in caplog.text
  assert isinstance(rerank.index(), retrieval.CoarseToFineIndex)
  assert index_store.read_manifest(directory)['backend'] == 'rerank'
  back = index_store.load_or_build(directory, gallery, step=1, **kwargs)
  assert back.rebuilt and back.backend == 'truncate'
  assert any(r.startswith("backend: saved 'rerank'") for r in back.stale_reasons), back.stale_reasons


def test_manifest_without_backend_is_a_rerank_index(tmp_path):
  gallery, _ = decaying_embeddings(300, 16)
  directory = str(tmp_path / 'index')
  assert index_store.load_or_build(directory, gallery, step=1, coarse_dim=8, shortlist=20).backend == 'rerank'
  path = os.path.join(directory, index_store.MANIFEST)
  manifest = index_store.read_manifest(directory)
  del manifest['backend']  # As written before the backend was recorded.
  with open(path, 'w') as f:
    json.dump(manifest, f)
  legacy = index_store.load_or_build(directory, gallery, step=1, coarse_dim=8, shortlist=20)
  assert not legacy.rebuilt and legacy.backend == 'rerank'
  assert index_store.load_or_build(directory, gallery, step=1, coarse_dim=8, shortlist=20,
                                   backend='truncate').rebuilt
