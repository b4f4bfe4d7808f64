"""Recall metrics on hand-built similarity matrices."""

import numpy as np

from hivlp_jax import evaluate
from hivlp_jax import retrieval


def test_ranks_count_ties_against_the_query():
  similarity = np.array([[0.9, 0.5, 0.9, 0.1],   # positive 0 ties with negative 2 -> rank 1
                         [0.2, 0.8, 0.3, 0.1],   # positive 1 is best -> rank 0
                         [0.5, 0.5, 0.5, 0.5]])  # all tied, positive 3 -> rank 3
  positives = np.eye(4, dtype=bool)[[0, 1, 3]]
  np.testing.assert_array_equal(evaluate.best_positive_ranks(similarity, positives), [1, 0, 3])
  assert evaluate.recall_at_k(similarity, positives, (1, 2, 4)) == {1: 1 / 3, 2: 2 / 3, 4: 1.0}


def test_unretrieved_positive_is_never_a_hit():
  similarity = np.array([[-np.inf, 0.3, -np.inf]])
  positives = np.array([[True, False, False]])
  assert evaluate.recall_at_k(similarity, positives, (1, 3)) == {1: 0.0, 3: 0.0}


def test_image_to_text_hit_when_any_of_five_captions_ranks():
  """2 images x 5 captions: image 0's best caption is 3rd overall, image 1's is 1st."""
  text_image_ids = np.repeat([0, 1], 5)
  # Two images; similarities of each image to the 10 captions (image-to-text direction).
  i2t = np.array([[0.1, 0.2, 0.7, 0.0, 0.0, 0.9, 0.8, 0.1, 0.1, 0.1],
                  [0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 0.2, 0.3, 0.9, 0.4]])
  positives = text_image_ids[None, :] == np.arange(2)[:, None]
  assert evaluate.recall_at_k(i2t, positives, (1, 2, 3)) == {1: 0.5, 2: 0.5, 3: 1.0}


def test_perfect_embeddings_give_recall_one_and_rsum_600():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(20, 16))
  texts = np.repeat(images, 5, axis=0) + rng.normal(scale=1e-3, size=(100, 16))
  metrics = evaluate.retrieval_metrics(images, texts, np.repeat(np.arange(20), 5), retrieval.ExactSearch(16))
  assert metrics['i2t_r1'] == metrics['t2i_r1'] == 1.0
  assert metrics['rsum'] == 600.0 and metrics['mean_recall'] == 100.0


def test_random_embeddings_are_near_chance():
  rng = np.random.default_rng(1)
  images, texts = rng.normal(size=(200, 32)), rng.normal(size=(1000, 32))
  metrics = evaluate.retrieval_metrics(images, texts, np.repeat(np.arange(200), 5), retrieval.ExactSearch(32))
  assert abs(metrics['t2i_r10'] - 10 / 200) < 0.03
