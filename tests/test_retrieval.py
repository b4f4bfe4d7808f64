"""Retrieval indexes: the top-k, exact search and coarse-to-fine search on real ScaNN (CPU, small galleries)."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from hivlp_jax import coarse_to_fine
from hivlp_jax import evaluate
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


def exact_top_k(queries, gallery, k, dim=None):
  return retrieval.ExactIndex(gallery, dim).search(queries, k)


def dense_scores(index, queries):
  """The [Q, G] matrix an index's candidates describe, -inf for the items it does not score (a test reference:
  the evaluator never builds it)."""
  scores, ids = index.candidates(queries)
  if ids is None:
    return np.asarray(scores)
  out = np.full((len(queries), index.num_items), -np.inf, np.float32)
  rows = np.broadcast_to(np.arange(len(queries))[:, None], ids.shape)
  assert all(len(set(row[row >= 0])) == (row >= 0).sum() for row in ids)  # No item twice.
  out[rows[ids >= 0], ids[ids >= 0]] = scores[ids >= 0]
  return out


def assert_matches_exact(index, queries, gallery):
  similarity = dense_scores(index, queries)
  exact = dense_scores(retrieval.ExactSearch(gallery.shape[1]).build(gallery), queries)
  assert np.all(np.isfinite(similarity))
  np.testing.assert_allclose(similarity, exact, atol=1e-5)


@pytest.mark.parametrize('settings,backend,index_type', [
    (None, 'auto', coarse_to_fine.CoarseToFineIndex),  # 400 items: below the brute-force threshold.
    (EXHAUSTIVE_TREE, 'rerank', coarse_to_fine.CoarseToFineIndex),
    (EXHAUSTIVE_TREE, 'truncate', coarse_to_fine.ScannPrefixIndex),
], ids=['brute_force', 'rerank_tree', 'truncate_tree'])
def test_two_stage_equals_exact_when_shortlist_covers_gallery(settings, backend, index_type):
  gallery, queries = decaying_embeddings(400, 64, num_queries=20)
  index = coarse_to_fine.TwoStageSearch(coarse_dim=8, shortlist=400, settings=settings, backend=backend
                                        ).build(gallery)
  assert isinstance(index, index_type)
  assert_matches_exact(index, queries, gallery)
  # Scores, not indices: equal scores may come back in either order.
  scores, indices = index.search(queries, k=10)
  exact_scores, _ = exact_top_k(queries, gallery, 10)
  np.testing.assert_allclose(scores, exact_scores, atol=1e-5)
  q, g = retrieval.normalized_prefix_np(queries, 64), retrieval.normalized_prefix_np(gallery, 64)
  np.testing.assert_allclose(np.sum(q[:, None] * g[indices], axis=-1), scores, atol=1e-5)


def test_two_stage_recall_with_small_shortlist():
  gallery, queries = decaying_embeddings(4000, 128, num_queries=100)
  _, exact_top10 = exact_top_k(queries, gallery, 10)
  # Brute force, and tree + AH scanning half the leaves, re-ranked by hand or by ScaNN's truncate mode
  # (measured: 1.0, 0.98 and 0.982 of the exact top-10 kept).
  half_tree = retrieval.ScannSettings(brute_force_below=0, num_leaves=40, leaves_to_search=20)
  for settings, backend in ((None, 'rerank'), (half_tree, 'rerank'), (half_tree, 'truncate')):
    index = coarse_to_fine.TwoStageSearch(32, 200, settings, backend=backend).build(gallery)
    _, candidates = index.candidates(queries)
    assert candidates.shape == (100, 200)
    assert retrieval.shortlist_recall(candidates, exact_top10) >= 0.95
    _, top10 = index.search(queries, 10)
    assert retrieval.shortlist_recall(top10, exact_top10) >= 0.95
    # The shortlist holds 5% of the gallery, the rest scores -inf.
    assert np.all(np.isfinite(dense_scores(index, queries[:5])).sum(axis=1) == 200)


def test_funnel_equals_exact_when_shortlists_cover_gallery():
  gallery, queries = decaying_embeddings(300, 64, num_queries=20)
  index = coarse_to_fine.FunnelSearch(stages=((8, 300), (16, 300), (32, 300))).build(gallery)
  assert_matches_exact(index, queries, gallery)


def test_funnel_shrinks_shortlist_and_ranks_at_final_dim():
  gallery, queries = decaying_embeddings(1000, 64, num_queries=10)
  index = coarse_to_fine.FunnelSearch(stages=((8, 500), (16, 50)), final_dim=48).build(gallery)
  scores, candidates = index.candidates(queries)
  assert candidates.shape == (10, 50)
  expected = np.sum(retrieval.normalized_prefix_np(queries, 48)[:, None]
                    * retrieval.normalized_prefix_np(gallery, 48)[candidates], axis=-1)
  np.testing.assert_allclose(scores, expected, atol=1e-5)


@pytest.mark.parametrize('final_dim', [None, 48])
def test_truncate_backend_equals_exact_search_when_exhaustive(final_dim):
  """Stage 1 (tree + AH on the 8-prefix) keeps every item, stage 2 is ScaNN's exact re-scoring: the
  exact top-k by the cosine of the normalised `final_dim`-prefixes."""
  gallery, queries = decaying_embeddings(400, 64, num_queries=20)
  mode = coarse_to_fine.TwoStageSearch(8, 400, EXHAUSTIVE_TREE, final_dim=final_dim, backend='truncate')
  index = mode.build(gallery)
  assert isinstance(index, coarse_to_fine.ScannPrefixIndex) and index.shortlist == 400
  dim = final_dim or 64
  exact_scores, _ = exact_top_k(queries, gallery, 400, dim=dim)
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
  small = coarse_to_fine.TwoStageSearch(8, 5, EXHAUSTIVE_TREE, backend='truncate').build(gallery)
  scores, indices = small.search(queries, 8)
  assert np.all(np.isfinite(scores[:, :5])) and np.all(np.isneginf(scores[:, 5:]))
  assert np.all(indices[:, 5:] == -1)


def test_auto_backend_follows_the_brute_force_threshold():
  gallery, queries = decaying_embeddings(600, 32, num_queries=5)
  settings = retrieval.ScannSettings(brute_force_below=500)
  mode = coarse_to_fine.TwoStageSearch(8, 50, settings)
  assert mode.backend == 'auto' and mode.name == 'two_stage_dim8_k50'
  assert mode.resolve_backend(600) == 'truncate' and mode.resolve_backend(499) == 'rerank'
  large, small = mode.build(gallery), mode.build(gallery[:400])
  assert isinstance(large, coarse_to_fine.ScannPrefixIndex) and isinstance(small, coarse_to_fine.CoarseToFineIndex)
  assert mode.scann_settings(600).num_leaves > 0 and mode.scann_settings(600).reorder == 50
  assert mode.scann_settings(400).num_leaves == 0  # Brute force.
  for index in (large, small):
    assert index.search(queries, 10)[1].shape == (5, 10)
  # A fixed backend ignores the gallery's size, and says so in the name.
  assert isinstance(coarse_to_fine.TwoStageSearch(8, 50, settings, backend='rerank').build(gallery),
                    coarse_to_fine.CoarseToFineIndex)
  assert isinstance(coarse_to_fine.TwoStageSearch(8, 50, settings, backend='truncate').build(gallery[:400]),
                    coarse_to_fine.ScannPrefixIndex)
  assert coarse_to_fine.TwoStageSearch(64, 1000, backend='rerank').name == 'two_stage_dim64_k1000_rerank'
  assert coarse_to_fine.TwoStageSearch(64, 1000, backend='truncate').name == 'two_stage_dim64_k1000_truncate'
  with pytest.raises(ValueError, match='backend'):
    coarse_to_fine.TwoStageSearch(8, 50, backend='scann')


def test_modes_from_config_pass_the_backend():
  config = ml_collections.ConfigDict({'model': {'nested_dims': (8, 32), 'embed_dim': 32},
                                      'eval': {'two_stage': ((8, 50),), 'funnel': (), 'two_stage_backend': 'auto',
                                               'ks': (1, 5, 10), 'scann': default.get_config().eval.scann}})
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
  exact_top = exact_top_k(queries, gallery, 10)[1]
  # Below the brute-force threshold stage 1 is the exact dim-8 top-20, so its recall of the full-dim top-10
  # is the overlap of two exact top lists, counted here with sets.
  coarse_top = exact_top_k(queries, gallery, 20, dim=8)[1]
  expected = np.mean([len(set(c) & set(e)) / 10 for c, e in zip(coarse_top, exact_top)])
  assert 0.3 < expected < 1.0  # A case where the figure is neither trivial value.
  rerank = evaluate.speed_metrics(queries, coarse_to_fine.TwoStageSearch(8, 20, backend='rerank').build(gallery),
                                  exact_top, latency_queries=10)
  assert rerank['shortlist_recall'] == pytest.approx(expected)
  assert 0 < rerank['stage1_p50_ms'] and 0 < rerank['p50_ms'] <= rerank['p99_ms'] and rerank['queries_per_s'] > 0
  truncate = evaluate.speed_metrics(queries, coarse_to_fine.TwoStageSearch(
      8, 300, settings=EXHAUSTIVE_TREE, backend='truncate').build(gallery), exact_top, latency_queries=10)
  assert truncate['shortlist_recall'] == 1.0 and 'stage1_p50_ms' not in truncate  # One ScaNN call, whole gallery.
  exact = evaluate.speed_metrics(queries, retrieval.ExactSearch(32).build(gallery), exact_top, latency_queries=10)
  assert set(exact) == {'p50_ms', 'p99_ms', 'queries_per_s'}
  results = evaluate.evaluate(gallery, queries, np.arange(40) % 300, [retrieval.ExactSearch(32)], (1, 5, 10),
                              latency_queries=5)
  assert {'t2i_p50_ms', 'i2t_queries_per_s', 'rsum'} <= set(results['exact_dim32'])
  assert 'text-to-image speed' in evaluate.format_table(results, (1, 5, 10))


def test_two_stage_plugs_into_the_evaluator():
  gallery, queries = decaying_embeddings(200, 32, num_queries=200, noise=0.3)
  ids = np.arange(200)
  exact = evaluate.retrieval_metrics(gallery, queries, ids, retrieval.ExactSearch(32))
  two_stage = evaluate.retrieval_metrics(gallery, queries, ids, coarse_to_fine.TwoStageSearch(8, 200))
  assert two_stage == pytest.approx(exact)
  truncate = coarse_to_fine.TwoStageSearch(8, 200, EXHAUSTIVE_TREE, backend='truncate')
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


def test_top_k_sorts_pads_and_ranks_nan_last():
  scores = np.array([[0.1, 0.9, np.nan, 0.5, 0.9],
                     [-np.inf, 0.2, 0.3, np.nan, 0.0]], np.float32)
  ids = np.array([[10, 11, 12, 13, 14], [20, 21, 22, 23, 24]])
  top_scores, top_ids = retrieval.top_k(scores, 3, ids)
  # Ties keep their column order (11 before 14); NaN is never among the best of a row with numbers.
  np.testing.assert_array_equal(top_ids, [[11, 14, 13], [22, 21, 24]])
  np.testing.assert_array_equal(top_scores, np.take_along_axis(scores, top_ids % 10, axis=1))
  assert top_ids.dtype == np.int64 and top_scores.dtype == np.float32
  # More than there are: every column sorted (NaN last), then -inf / -1.
  top_scores, top_ids = retrieval.top_k(scores, 7)
  np.testing.assert_array_equal(top_ids[0], [1, 4, 3, 0, 2, -1, -1])
  assert np.isnan(top_scores[0, 4]) and np.all(np.isneginf(top_scores[:, 5:]))
  # A tie at the k-th place goes to the lower column too, as jax.lax.top_k (device arrays) has it.
  tied = np.array([[0.5, 0.7, 0.5, 0.5, 0.7, 0.5]], np.float32)
  np.testing.assert_array_equal(retrieval.top_k(tied, 3)[1], [[1, 4, 0]])
  for case, k in ((scores, 3), (scores, 7), (tied, 3), (tied, 4)):
    on_device, on_host = retrieval.top_k(jnp.asarray(case), k), retrieval.top_k(case, k)
    np.testing.assert_array_equal(on_device[1], on_host[1])
    np.testing.assert_array_equal(on_device[0], on_host[0])
    assert on_device[0].dtype == np.float32 and on_device[1].dtype == np.int64


def test_exact_index_search_is_the_exact_top_k_and_pads_past_the_gallery():
  gallery, queries = decaying_embeddings(50, 16, num_queries=7)
  index = retrieval.ExactSearch(8).build(gallery)
  similarity = dense_scores(index, queries)
  scores, ids = index.search(queries, 5, chunk_size=3)  # Chunks of 3 queries: the last one partial.
  np.testing.assert_array_equal(ids, np.argsort(-similarity, axis=1, kind='stable')[:, :5])
  np.testing.assert_allclose(scores, np.sort(similarity, axis=1)[:, ::-1][:, :5], atol=1e-6)
  scores, ids = index.search(queries, 60)
  assert np.all(ids[:, 50:] == -1) and np.all(np.isneginf(scores[:, 50:])) and np.all(ids[:, :50] >= 0)


@pytest.mark.parametrize('mode', [
    retrieval.ExactSearch(32),
    coarse_to_fine.TwoStageSearch(8, 40, backend='auto'),
    coarse_to_fine.TwoStageSearch(8, 40, EXHAUSTIVE_TREE, backend='rerank'),
    coarse_to_fine.TwoStageSearch(8, 40, EXHAUSTIVE_TREE, backend='truncate'),
    coarse_to_fine.FunnelSearch(((8, 100), (16, 40))),
], ids=lambda mode: mode.name)
def test_every_mode_builds_an_index_whose_search_agrees_with_its_candidates(mode):
  """The evaluator ranks `candidates`, a deployment reads `search`: both must describe the same retrieval."""
  gallery, queries = decaying_embeddings(300, 32, num_queries=12)
  index = mode.build(gallery)
  assert index.num_items == 300
  similarity = dense_scores(index, queries)
  assert similarity.shape == (12, 300)
  scores, ids = index.search(queries, 50)  # More than a 40 shortlist: the rest is padding.
  assert scores.shape == ids.shape == (12, 50)
  np.testing.assert_array_equal(scores, -np.sort(-scores, axis=1))  # Descending.
  retrieved = ids >= 0
  assert np.all(np.isneginf(scores[~retrieved]))
  rows = np.broadcast_to(np.arange(12)[:, None], ids.shape)
  np.testing.assert_allclose(similarity[rows[retrieved], ids[retrieved]], scores[retrieved], atol=1e-6)
  # The candidates are what search retrieved (the shortlist), -inf elsewhere; exact search retrieves all.
  expected = 300 if isinstance(index, retrieval.ExactIndex) else retrieved.sum(axis=1)
  np.testing.assert_array_equal(np.isfinite(similarity).sum(axis=1), expected)
  assert np.all(retrieved.sum(axis=1) == (50 if isinstance(index, retrieval.ExactIndex) else 40))
