"""Ranks and recall without a [queries, gallery] matrix: the metric math of the evaluator.

A mode's index scores a block of queries at a time (`rank_queries`), and from each block's scores over its
candidates (the whole gallery for exact search, the shortlist for coarse-to-fine) only two things are kept
per query: its top-K (scores, ids) and the rank of its best positive, the number of negatives scoring at
least as high (a tie counts against the query). Recall@k and the median rank come from that rank, not from
the top-K list: the list breaks a tie at its K-th place by item id instead of against the query, and knows
no rank past K. Memory: O(block x gallery + queries x K). The functions on scores are pure, and take numpy
or (on an accelerator, for exact search) device arrays.
"""

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hivlp_jax import retrieval


def best_positive_ranks(similarity, positives, num_items: Optional[int] = None):
  """0-based rank of each query's best-scoring positive; ties count against the query.

  NaN is the lowest score: a NaN positive beats nothing and a NaN negative beats no finite positive. A
  positive scoring +inf is no hit either (no finite embeddings give it), while a +inf negative outranks
  every positive. numpy arrays in, numpy out; device arrays stay on their device.

  Args:
    similarity: [Q, C] scores of each query's candidates: the whole gallery, or a shortlist (the items
      outside it score -inf, so they never count).
    positives: bool [Q, C], True where the candidate is a correct answer.
    num_items: the gallery size G (default C), the rank of a query with no finite positive.
  Returns:
    int [Q]: the number of negatives scoring at least as high as the best positive. A query whose
    positives all score -inf, inf or NaN (or are not among its candidates) gets rank G (never a hit).
  """
  best = best_positive_scores(similarity, positives)
  return ranks_from_counts(negatives_at_least(similarity, positives, best), best,
                           similarity.shape[1] if num_items is None else num_items)


def best_positive_scores(similarity, positives):
  """[Q]: the highest finite score of each query's positives among [Q, C] candidates (-inf: none)."""
  xp = jnp if isinstance(similarity, jax.Array) else np
  return xp.max(xp.where(positives & xp.isfinite(similarity), similarity, -xp.inf), axis=1)


def negatives_at_least(similarity, positives, best):
  """[Q]: how many negatives among [Q, C] candidates score at least `best` [Q] (NaN never counts)."""
  xp = jnp if isinstance(similarity, jax.Array) else np
  return xp.sum((similarity >= xp.asarray(best)[:, None]) & ~positives, axis=1)


def ranks_from_counts(counts, best, num_items: int):
  """[Q] ranks: `counts` where a query has a finite best positive score `best`, else `num_items`."""
  xp = jnp if isinstance(counts, jax.Array) else np
  return xp.where(xp.isneginf(xp.asarray(best)), num_items, counts)


def positive_mask(ids: Optional[np.ndarray], positive_ids: np.ndarray, num_columns: int, xp=np):
  """bool [Q, C]: which candidates are positives.

  Args:
    ids: int [Q, C], the item of each candidate (-1: empty slot), or None: candidate c is item c.
    positive_ids: int [Q, P], each query's positive items (-1: padding).
    num_columns: C; xp: np, or jnp for a mask on the device.
  """
  columns = xp.arange(num_columns)[None, :] if ids is None else xp.asarray(ids)
  positive_ids = xp.asarray(positive_ids)
  mask = xp.zeros((positive_ids.shape[0], num_columns), bool)
  for p in range(positive_ids.shape[1]):  # P is small (5 captions): no [Q, C, P] temporary.
    item = positive_ids[:, p:p + 1]
    mask = mask | ((columns == item) & (item >= 0))
  return mask


def positives_per_query(text_image_ids: np.ndarray, num_images: int) -> tuple[np.ndarray, np.ndarray]:
  """The positives map: image-to-text int [N, P] (each image's captions, -1 padded; P the most captions
  of an image) and text-to-image int [T, 1] (each caption's image), from text_image_ids int [T]."""
  text_image_ids = np.asarray(text_image_ids, np.int64)
  counts = np.bincount(text_image_ids, minlength=num_images)
  order = np.argsort(text_image_ids, kind='stable')
  slot = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)  # Rank within its image.
  captions = np.full((num_images, max(1, int(counts.max(initial=0)))), -1, np.int64)
  captions[text_image_ids[order], slot] = order
  return captions, text_image_ids[:, None]


@dataclasses.dataclass
class Ranking:
  """One mode's answer to Q queries: rank int [Q] (see `best_positive_ranks`) and top-K scores float32
  [Q, K] / ids int64 [Q, K] (descending; -inf / -1 past what it retrieved)."""
  ranks: np.ndarray
  scores: np.ndarray
  ids: np.ndarray


def rank_queries(index: retrieval.Index, queries: np.ndarray, positive_ids: np.ndarray, k: int,
                 block: Optional[int] = None) -> Ranking:
  """Ranks queries [Q, D] with a built index, `block` queries at a time (default `retrieval.block_rows(G)`).

  positive_ids: int [Q, P], each query's positive items (-1: padding). Each block's candidate scores
  [block, C] (`index.candidates`) give its top-k (`retrieval.top_k`) and best-positive ranks, then are
  dropped: memory O(block x G + Q x k). Every block has `block` rows (the last one padded), or there is one
  block of all Q, so exact search scores as one [Q, G] matmul would (`retrieval.MIN_BLOCK_ROWS`). On an
  accelerator exact search ranks on the device.
  """
  out = Ranking(np.empty(len(queries), np.int64), np.empty((len(queries), k), np.float32),
                np.empty((len(queries), k), np.int64))
  for rows, scores, ids in scored_blocks(index, queries, block or retrieval.block_rows(index.num_items)):
    if ids is None and not isinstance(scores, jax.Array):  # The whole gallery on the host: no [n, G] mask.
      out.ranks[rows] = _ranks_of_gallery_scores(scores, positive_ids[rows], index.num_items)
    else:
      xp = jnp if isinstance(scores, jax.Array) else np
      positives = positive_mask(ids, positive_ids[rows], scores.shape[1], xp)
      out.ranks[rows] = np.asarray(best_positive_ranks(scores, positives, index.num_items))
    out.scores[rows], out.ids[rows] = retrieval.top_k(scores, k, ids)
  return out


def _ranks_of_gallery_scores(scores: np.ndarray, positive_ids: np.ndarray, num_items: int) -> np.ndarray:
  """`best_positive_ranks` of host scores [n, G] over the whole gallery, with positives given by id [n, P]
  (distinct in a row, -1 padding): one pass over the scores instead of building a [n, G] mask."""
  valid = positive_ids >= 0
  positive_scores = np.where(valid, np.take_along_axis(scores, np.maximum(positive_ids, 0), axis=1), np.nan)
  best = np.max(np.where(np.isfinite(positive_scores), positive_scores, -np.inf), axis=1)  # [n]
  # Every item at least `best`, less the positives among them (NaN compares False: never counted).
  counts = np.sum(scores >= best[:, None], axis=1) - np.sum(positive_scores >= best[:, None], axis=1)
  return ranks_from_counts(counts, best, num_items)


def scored_blocks(index: retrieval.Index, queries: np.ndarray, block: int):
  """Yields (rows, scores [n, C], ids [n, C] or None): `index.candidates` of each block of `block` queries.

  Every block is scored with `block` rows (the last one padded with copies of its last query, padding
  dropped from the result), or there is one block of all Q: a fixed matmul shape, so exact search scores
  as one [Q, G] matmul would (`retrieval.MIN_BLOCK_ROWS`).
  """
  for start in range(0, len(queries), block):
    rows = slice(start, start + block)
    block_queries = queries[rows]
    n = len(block_queries)
    if n < min(block, len(queries)):
      block_queries = np.concatenate([block_queries, np.repeat(block_queries[-1:], block - n, axis=0)])
    scores, ids = index.candidates(block_queries)
    yield rows, scores[:n], (None if ids is None else ids[:n])


def recall_at_k(ranks: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
  """{k: R@k, the percent of queries whose best positive ranks below k} from ranks int [Q].

  Percent, as the papers report R@K and as RSUM sums them: the framework's one unit of retrieval recall.
  """
  return {k: 100.0 * np.count_nonzero(ranks < k) / len(ranks) for k in ks}


def median_rank(ranks: np.ndarray) -> float:
  """MedR: the median 1-based rank of the best positive (a positive never retrieved ranks G + 1)."""
  return float(np.median(ranks + 1))


def mean_rank(ranks: np.ndarray) -> float:
  """MnR (video retrieval's convention): the mean 1-based rank of the best positive, G + 1 when never retrieved."""
  return float(np.mean(ranks + 1))
