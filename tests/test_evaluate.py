"""Recall metrics on hand-built similarity matrices, and the blockwise top-K evaluation against the dense one."""

import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from hivlp_jax import coarse_to_fine
from hivlp_jax import evaluate
from hivlp_jax import ranking
from hivlp_jax import retrieval


def _recall(similarity, positives, ks):
  return ranking.recall_at_k(ranking.best_positive_ranks(similarity, positives), ks)


def test_ranks_count_ties_against_the_query():
  similarity = np.array([[0.9, 0.5, 0.9, 0.1],   # positive 0 ties with negative 2 -> rank 1
                         [0.2, 0.8, 0.3, 0.1],   # positive 1 is best -> rank 0
                         [0.5, 0.5, 0.5, 0.5]])  # all tied, positive 3 -> rank 3
  positives = np.eye(4, dtype=bool)[[0, 1, 3]]
  np.testing.assert_array_equal(ranking.best_positive_ranks(similarity, positives), [1, 0, 3])
  assert _recall(similarity, positives, (1, 2, 4)) == pytest.approx({1: 100 / 3, 2: 200 / 3, 4: 100.0})
  assert ranking.median_rank(ranking.best_positive_ranks(similarity, positives)) == 2.0


def test_unretrieved_positive_is_never_a_hit():
  similarity = np.array([[-np.inf, 0.3, -np.inf]])
  positives = np.array([[True, False, False]])
  assert _recall(similarity, positives, (1, 3)) == {1: 0.0, 3: 0.0}


def test_image_to_text_hit_when_any_of_five_captions_ranks():
  """2 images x 5 captions: image 0's best caption is 3rd overall, image 1's is 1st."""
  text_image_ids = np.repeat([0, 1], 5)
  # Two images; similarities of each image to the 10 captions (image-to-text direction).
  i2t = np.array([[0.1, 0.2, 0.7, 0.0, 0.0, 0.9, 0.8, 0.1, 0.1, 0.1],
                  [0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 0.2, 0.3, 0.9, 0.4]])
  positives = text_image_ids[None, :] == np.arange(2)[:, None]
  assert _recall(i2t, positives, (1, 2, 3)) == {1: 50.0, 2: 50.0, 3: 100.0}  # Percent.


def test_perfect_embeddings_give_recall_100_and_rsum_600():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(20, 16))
  texts = np.repeat(images, 5, axis=0) + rng.normal(scale=1e-3, size=(100, 16))
  metrics = evaluate.retrieval_metrics(images, texts, np.repeat(np.arange(20), 5), retrieval.ExactSearch(16))
  assert metrics['i2t_r1'] == metrics['t2i_r1'] == 100.0  # Percent, as RSUM sums them.
  assert metrics['rsum'] == 600.0 and metrics['mean_recall'] == 100.0


def test_random_embeddings_are_near_chance():
  rng = np.random.default_rng(1)
  images, texts = rng.normal(size=(200, 32)), rng.normal(size=(1000, 32))
  metrics = evaluate.retrieval_metrics(images, texts, np.repeat(np.arange(200), 5), retrieval.ExactSearch(32))
  assert abs(metrics['t2i_r10'] - 100 * 10 / 200) < 3


def _ranks_before_nan_handling(similarity, positives):
  """best_positive_ranks as it was before NaN was handled: the reference for finite scores."""
  best = np.max(np.where(positives, similarity, -np.inf), axis=1, keepdims=True)
  ranks = np.sum((similarity >= best) & ~positives, axis=1)
  return np.where(np.isneginf(best[:, 0]), similarity.shape[1], ranks)


def test_ranks_of_finite_scores_are_unchanged():
  rng = np.random.default_rng(0)
  # Scores on a coarse grid: many ties; some items not retrieved (-inf).
  similarity = np.round(rng.uniform(-1, 1, size=(200, 30)), 1)
  similarity[rng.uniform(size=similarity.shape) < 0.2] = -np.inf
  positives = rng.uniform(size=similarity.shape) < 0.1
  ranks = ranking.best_positive_ranks(similarity, positives)
  np.testing.assert_array_equal(ranks, _ranks_before_nan_handling(similarity, positives))
  assert 0 < np.mean(ranks < 5) < 1  # Neither trivial value.


def test_all_nan_similarity_is_never_a_hit():
  similarity = np.full((3, 4), np.nan)
  positives = np.eye(4, dtype=bool)[:3]
  np.testing.assert_array_equal(ranking.best_positive_ranks(similarity, positives), [4, 4, 4])
  assert _recall(similarity, positives, (1, 4)) == {1: 0.0, 4: 0.0}


def test_nan_is_the_lowest_score_and_inf_positives_are_no_hits():
  nan, inf = np.nan, np.inf
  similarity = np.array([[nan, 0.2, 0.1],    # NaN positive: beats nothing -> never a hit
                         [0.5, nan, nan],    # NaN negatives do not beat a finite positive -> rank 0
                         [0.5, nan, 0.5],    # the tie still counts against the query -> rank 1
                         [nan, 0.3, -inf],   # a NaN and a finite positive: the finite one counts -> rank 0
                         [inf, 0.9, 0.1],    # a +inf positive is no hit
                         [0.4, inf, nan]])   # a +inf negative outranks the positive -> rank 1
  positives = np.array([[1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 0, 0], [1, 0, 0]], bool)
  np.testing.assert_array_equal(ranking.best_positive_ranks(similarity, positives), [3, 0, 1, 0, 3, 1])


def _dense_reference(similarity, positives, ks):
  """The metrics as the evaluator computed them from the dense [Q, G] matrix before issue 14 (numpy):
  ({k: recall@k}, median 1-based rank)."""
  best = np.max(np.where(positives & np.isfinite(similarity), similarity, -np.inf), axis=1, keepdims=True)
  ranks = np.sum((similarity >= best) & ~positives, axis=1)
  ranks = np.where(np.isneginf(best[:, 0]), similarity.shape[1], ranks)
  return {k: 100.0 * np.count_nonzero(ranks < k) / len(ranks) for k in ks}, float(np.median(ranks + 1))


class MatrixIndex:
  """A hand-built score matrix [Q, G] as a `retrieval.Index` whose queries are row numbers [Q, 1].

  Whole, it is exact search (ids None); as a shortlist, each row's candidates are its entries that are not
  -inf, shuffled and padded with -1 / -inf, which the dense matrix says of a coarse-to-fine shortlist. On
  the device, its scores are JAX arrays."""

  def __init__(self, matrix, shortlist=False, device=False, seed=0):
    self.matrix, self.num_items, self.shortlist, self.device = matrix, matrix.shape[1], shortlist, device
    self.rng = np.random.default_rng(seed)

  def candidates(self, queries):
    rows = self.matrix[queries[:, 0]]
    if not self.shortlist:
      return (jnp.asarray(rows) if self.device else rows), None
    width = int((~np.isneginf(rows)).sum(axis=1).max())
    scores, ids = np.full((len(rows), width), -np.inf, np.float32), np.full((len(rows), width), -1)
    for i, row in enumerate(rows):
      kept = self.rng.permutation(np.flatnonzero(~np.isneginf(row)))
      scores[i, :len(kept)], ids[i, :len(kept)] = row[kept], kept
    return scores, ids


def _hand_built_split(seed, num_images, captions=5, grid=0.1):
  """i2t scores [N, 5N] on a coarse grid (many ties) with NaN, +-inf and unretrieved (-inf) items, and
  text_image_ids [5N] in a shuffled caption order."""
  rng = np.random.default_rng(seed)
  text_image_ids = rng.permutation(np.repeat(np.arange(num_images), captions))
  shape = (num_images, captions * num_images)
  on_grid = lambda low: (np.round(rng.uniform(low, 1, shape) / grid) * grid).astype(np.float32)
  positives = text_image_ids[None, :] == np.arange(num_images)[:, None]
  i2t = np.where(positives, on_grid(-0.4), on_grid(-1))  # Positives a little higher, on the same grid.
  for value, fraction in ((np.nan, 0.03), (np.inf, 0.01), (-np.inf, 0.2)):
    i2t[rng.uniform(size=shape) < fraction] = value
  return i2t, text_image_ids


@pytest.mark.parametrize('seed', range(8))
def test_blockwise_top_k_ranking_equals_the_dense_recall(seed):
  """Both directions, 5 captions per image, ties, NaN and inf: recall@k and MedR of `rank_queries`, in
  blocks of 3 queries (the last one partial), equal the dense matrix's, for a whole gallery and shortlists."""
  i2t, text_image_ids = _hand_built_split(seed, num_images=8 + seed)
  ks = (1, 5, 10)
  positives_i2t, positives_t2i = ranking.positives_per_query(text_image_ids, i2t.shape[0])
  dense_positives = text_image_ids[None, :] == np.arange(i2t.shape[0])[:, None]  # [N, T]
  for similarity, positive_ids, positives in ((i2t, positives_i2t, dense_positives),
                                              (i2t.T.copy(), positives_t2i, dense_positives.T)):
    recall, medr = _dense_reference(similarity, positives, ks)
    queries = np.arange(len(similarity))[:, None]
    whole, shortlist = (ranking.rank_queries(index, queries, positive_ids, max(ks), block=3) for index in
                        (MatrixIndex(similarity), MatrixIndex(similarity, shortlist=True, seed=seed)))
    for ranked in (whole, shortlist):
      assert ranking.recall_at_k(ranked.ranks, ks) == recall
      assert ranking.median_rank(ranked.ranks) == medr
      # Rank by rank too: the whole gallery takes the by-id path, a shortlist the mask path.
      np.testing.assert_array_equal(ranked.ranks, ranking.best_positive_ranks(similarity, positives))
    assert recall[10] > 0 and recall[1] < 100  # Not a trivial case.
    # The top-K of the whole gallery is the one top-k of each row.
    expected_scores, expected_ids = retrieval.top_k(similarity, max(ks))
    np.testing.assert_array_equal(whole.ids, expected_ids)
    np.testing.assert_array_equal(whole.scores, expected_scores)


def test_the_device_path_ranks_as_the_host_path():
  """Scores left on the device (exact search on an accelerator): jnp ranks and jax.lax.top_k, same answer."""
  i2t, text_image_ids = _hand_built_split(0, num_images=12)
  positive_ids, _ = ranking.positives_per_query(text_image_ids, 12)
  queries = np.arange(12)[:, None]
  host = ranking.rank_queries(MatrixIndex(i2t), queries, positive_ids, 10, block=6)
  device = ranking.rank_queries(MatrixIndex(i2t, device=True), queries, positive_ids, 10, block=6)
  np.testing.assert_array_equal(device.ranks, host.ranks)
  np.testing.assert_array_equal(device.scores, host.scores)  # NaN included.
  np.testing.assert_array_equal(device.ids, host.ids)  # Ties, also at the K-th place, to the lower column.
  assert (np.diff(host.scores, axis=1) == 0).any()  # Ties in the top-K.


def test_positives_per_query_pads_images_with_fewer_captions():
  captions, images = ranking.positives_per_query(np.array([2, 0, 2, 2, 0]), num_images=4)
  np.testing.assert_array_equal(captions, [[1, 4, -1], [-1, -1, -1], [0, 2, 3], [-1, -1, -1]])
  np.testing.assert_array_equal(images[:, 0], [2, 0, 2, 2, 0])


def test_exact_search_metrics_equal_the_dense_metrics_with_duplicate_captions(monkeypatch):
  """Exact search through `evaluate.retrieval_metrics`, ranked in blocks of 64 images or 320 captions (the
  last one padded), against the dense reference over the same scores: duplicated captions and images give
  exact ties."""
  rng = np.random.default_rng(3)
  images = rng.normal(size=(100, 16)).astype(np.float32)
  images[5] = images[4]  # Two identical images.
  texts = np.repeat(images, 5, axis=0) + rng.normal(scale=0.8, size=(500, 16)).astype(np.float32)
  texts[1] = texts[0]  # Identical captions of one image, and of two images.
  texts[7] = texts[12]
  ids = np.repeat(np.arange(100), 5)
  ks = (1, 5, 10)
  dense = {}
  for name, queries, gallery, positives in (('i2t', images, texts, ids[None, :] == np.arange(100)[:, None]),
                                            ('t2i', texts, images, ids[:, None] == np.arange(100)[None, :])):
    scores = retrieval.ExactIndex(gallery, 8).candidates(queries)[0]  # [Q, G] at once: the dense matrix.
    recall, dense[f'{name}_medr'] = _dense_reference(scores, positives, ks)
    dense.update({f'{name}_r{k}': v for k, v in recall.items()})
  monkeypatch.setattr(retrieval, 'BLOCK_BYTES', 4 * 500 * 64)  # Blocks of 64 images, 320 captions.
  metrics = evaluate.retrieval_metrics(images, texts, ids, retrieval.ExactSearch(8), ks)
  assert {k: metrics[k] for k in dense} == dense
  assert 0 < metrics['t2i_r1'] < 100 and metrics['i2t_r1'] < 100  # Not a trivial case.


def test_check_finite_names_the_step_and_the_rows():
  images, texts = np.ones((4, 8), np.float32), np.ones((20, 8), np.float32)
  evaluate.check_finite({'image': images, 'text': texts}, step=7)  # Finite: no error.
  texts[[3, 11], 2] = [np.nan, np.inf]
  with pytest.raises(ValueError, match=r'2 of 20 text embeddings at checkpoint step 7 .*row 3'):
    evaluate.check_finite({'image': images, 'text': texts}, step=7)


def test_evaluate_refuses_non_finite_embeddings():
  rng = np.random.default_rng(0)
  images, texts = rng.normal(size=(10, 16)), rng.normal(size=(50, 16))
  ids = np.repeat(np.arange(10), 5)
  modes = [retrieval.ExactSearch(16)]
  assert evaluate.evaluate(images, texts, ids, modes, (1,), step=3)['exact_dim16']['t2i_r1'] >= 0
  images[4] = np.nan
  with pytest.raises(ValueError, match='image embeddings at checkpoint step 3'):
    evaluate.evaluate(images, texts, ids, modes, (1,), step=3)
  with pytest.raises(ValueError, match='unknown checkpoint step'):
    evaluate.evaluate(images, texts, ids, modes, (1,))


def _eval_config(**eval_fields):
  config = default.get_config()  # embed_dim 256, nested dims (16, 32, 64, 128, 256).
  config.eval.update(eval_fields)
  return config


def test_validate_config_accepts_the_default_and_modes_follow_it():
  evaluate.validate_config(default.get_config())
  config = _eval_config(two_stage=((32, 50), (256, 10)), funnel=((16, 200), (64, 50), (256, 50)))
  names = [mode.name for mode in evaluate.modes_from_config(config)]
  assert names[-3:] == ['two_stage_dim32_k50', 'two_stage_dim256_k10', 'funnel_16x200_64x50_256x50']


@pytest.mark.parametrize('eval_fields,message', [
    (dict(two_stage=((512, 50),)), r'config.eval.two_stage\[0\]: dim 512 is not in \[1, config.model.embed_dim=256\]'),
    (dict(two_stage=((32, 50), (0, 50))), r'config.eval.two_stage\[1\]: dim 0'),
    (dict(two_stage=((32, 0),)), r'config.eval.two_stage\[0\]: shortlist 0 must be positive'),
    (dict(two_stage=((32, 50, 1),)), r'config.eval.two_stage\[0\]=\(32, 50, 1\) is not a \(dim, shortlist\) pair'),
    (dict(two_stage=((32, 50), (32, 50))), r'config.eval.two_stage=.* repeats an entry'),
    (dict(funnel=((16, 200), (300, 50))), r'config.eval.funnel\[1\]: dim 300 is not in'),
    (dict(funnel=((16, 200), (64, -5))), r'config.eval.funnel\[1\]: shortlist -5'),
    (dict(funnel=((64, 200), (16, 50))), r'config.eval.funnel dims \[64, 16\] must strictly increase'),
    (dict(funnel=((16, 50), (64, 200))), r'config.eval.funnel shortlists \[50, 200\] must not grow'),
    (dict(ks=(1, 0, 10)), r'config.eval.ks=\(1, 0, 10\) must be one or more positive integers'),
    (dict(two_stage_backend='scann'), r"config.eval.two_stage_backend='scann' is not one of"),
])
def test_validate_config_names_the_field(eval_fields, message):
  config = _eval_config(**eval_fields)
  with pytest.raises(ValueError, match=message):
    evaluate.validate_config(config)
  with pytest.raises(ValueError, match=message):  # No mode is built under a name it does not serve.
    evaluate.modes_from_config(config)


def test_validate_config_checks_the_scann_settings_and_a_backend_override():
  config = _eval_config()
  config.eval.scann.num_leaves = -1
  with pytest.raises(ValueError, match=r'config.eval.scann.num_leaves=-1 must be >= 0'):
    evaluate.validate_config(config)
  with pytest.raises(ValueError, match=r"two_stage_backend='fast' is not one of"):
    evaluate.validate_config(_eval_config(), two_stage_backend='fast')


def test_a_recall_target_tunes_each_coarse_to_fine_index_against_exact_search():
  """config.eval.scann.target_recall in the evaluator: a ScaNN tree scanning 1 of 40 leaves loses recall;
  tuned to recall@10 0.95 of exact search (on sampled queries, no labels), it comes within a few points of
  the exact mode's R@10 (measured: 1.1-2.3 below it; 19 and 52 below untuned), reports its point, and never
  shortens the mode's shortlist. The pick is timed, so it varies from run to run."""
  rng = np.random.default_rng(5)
  centres = rng.normal(size=(20, 32))
  images = (centres[rng.integers(20, size=1500)] + 0.7 * rng.normal(size=(1500, 32))).astype(np.float32)
  texts = (np.repeat(images, 2, axis=0) + 0.9 * rng.normal(size=(3000, 32))).astype(np.float32)
  ids = np.repeat(np.arange(1500), 2)
  stingy = retrieval.ScannSettings(brute_force_below=0, num_leaves=40, leaves_to_search=1, threads=1)
  modes = [retrieval.ExactSearch(32), coarse_to_fine.TwoStageSearch(16, 30, stingy, backend='rerank')]
  fixed = evaluate.evaluate(images, texts, ids, modes, (1, 5, 10))
  tuned = evaluate.evaluate(images, texts, ids, modes, (1, 5, 10), target_recall=0.95)
  exact, name = tuned['exact_dim32'], 'two_stage_dim16_k30_rerank'
  assert fixed[name]['t2i_r10'] < exact['t2i_r10'] - 15  # One leaf of 40 misses many neighbours.
  for direction in ('i2t', 't2i'):
    assert tuned[name][f'{direction}_tuned_recall_at_10'] >= 0.95
    assert tuned[name][f'{direction}_tuned_shortlist'] >= 30 and tuned[name][f'{direction}_tuned_leaves_to_search'] > 1
    assert exact[f'{direction}_r10'] - tuned[name][f'{direction}_r10'] <= 4, (tuned[name], exact)
    assert tuned[name][f'{direction}_r10'] > fixed[name][f'{direction}_r10'] + 10, (tuned[name], fixed[name])
  assert 't2i_tuned_shortlist' not in fixed[name] and 't2i_tuned_shortlist' not in exact
