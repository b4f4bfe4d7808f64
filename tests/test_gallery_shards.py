"""Galleries sharded over processes, run as threads of one process joined by a barrier gather: the merged
top-K, ranks and metrics equal one index over the whole gallery, ties and 5 captions per image included."""

import threading

import numpy as np
import pytest

from hivlp_jax import coarse_to_fine
from hivlp_jax import errors
from hivlp_jax import evaluate
from hivlp_jax import gallery_shards
from hivlp_jax import ranking
from hivlp_jax import retrieval


class ThreadGather:
  """An all-gather among `count` threads: each passes its array, all get them stacked in shard order."""

  def __init__(self, count: int):
    self.slots = [None] * count
    self.barrier = threading.Barrier(count)

  def shard(self, index: int) -> gallery_shards.Shard:
    def gather(array):
      self.slots[index] = np.asarray(array)
      self.barrier.wait()
      out = np.stack(self.slots)
      self.barrier.wait()  # Nobody overwrites a slot before every thread has read them all.
      return out
    return gallery_shards.Shard(index, len(self.slots), gather)


def run_sharded(count: int, function):
  """function(shard) on `count` threads; their results in shard order (a thread's exception re-raised)."""
  gather, results, failures = ThreadGather(count), [None] * count, []

  def body(i):
    try:
      results[i] = function(gather.shard(i))
    except BaseException as e:  # pylint: disable=broad-except
      failures.append(e)
      gather.barrier.abort()
  threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  if failures:
    raise failures[0]
  return results


def _split(num_images=103, captions=5, dim=16, seed=0):
  """Image [N, D] and caption [5N, D] embeddings with exact ties: duplicated images and captions."""
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((num_images, dim)).astype(np.float32)
  images[10] = images[3]  # Two identical images: every caption of image 3 ties between them.
  texts = np.repeat(images, captions, axis=0) + 0.8 * rng.standard_normal((num_images * captions, dim), np.float32)
  texts[7] = texts[40]  # Two identical captions of different images.
  return images, texts, np.repeat(np.arange(num_images), captions)


def test_shard_bounds_cover_the_gallery_and_a_bad_count_is_named():
  bounds = [gallery_shards.Shard(i, 3, None).bounds(10) for i in range(3)]
  assert bounds == [(0, 4), (4, 7), (7, 10)]
  with pytest.raises(errors.InputError, match='Shard 2 of 2: a gallery shard count must match the processes'):
    gallery_shards.Shard(2, 2, None)


@pytest.mark.parametrize('count', [2, 3])
def test_sharded_exact_ranking_equals_one_index(count):
  images, texts, text_image_ids = _split()
  _, t2i = ranking.positives_per_query(text_image_ids, len(images))
  whole = ranking.rank_queries(retrieval.ExactIndex(images), texts, t2i, k=10)

  def sharded(shard):
    start, stop = shard.bounds(len(images))
    return gallery_shards.rank_queries(retrieval.ExactIndex(images[start:stop]), shard, len(images), texts, t2i, 10)
  for result in run_sharded(count, sharded):
    np.testing.assert_array_equal(result.ranks, whole.ranks)
    np.testing.assert_array_equal(result.ids, whole.ids)  # Ties at equal scores: the lower id, as one index.
    np.testing.assert_allclose(result.scores, whole.scores, atol=1e-6)
  assert (whole.ranks > 0).any() and (whole.ranks == 0).any()  # Not a trivial split.


def test_sharded_evaluation_equals_one_process():
  """Every exact mode's metrics are equal; a two-stage mode whose shortlist covers each share equals too."""
  images, texts, text_image_ids = _split()
  modes = [retrieval.ExactSearch(16), retrieval.ExactSearch(4),
           coarse_to_fine.TwoStageSearch(4, 600), coarse_to_fine.FunnelSearch(((4, 600), (8, 300)))]
  whole = evaluate.evaluate(images, texts, text_image_ids, modes, (1, 5, 10))
  for result in run_sharded(2, lambda shard: evaluate.evaluate(images, texts, text_image_ids, modes, (1, 5, 10),
                                                               shard=shard)):
    assert result == whole
  assert 20 < whole['exact_dim16']['t2i_r1'] < 99
