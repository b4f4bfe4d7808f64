"""Galleries sharded over processes: each process indexes a contiguous share of the gallery, every query
is ranked against every share, and only K scores and ids (plus two numbers) per query are exchanged.

Per block of queries (every process holds every query and runs the same blocks):
  1. each process scores the block against its share with its own index (`Index.candidates`), keeps its
     top-K with global ids and the best finite score of each query's positives in its share;
  2. gather [P, q, K] and [P, q]: the global top-K is the top-K of the P lists (`retrieval.top_k`, ties
     to the lower global id, as one index over the whole gallery breaks them), the best positive score
     the largest of the P;
  3. each process counts its negatives scoring at least that best score; gather [P, q] and sum: the rank
     of `ranking.best_positive_ranks`, tie rule included.
For exact search this is the unsharded result; a coarse-to-fine mode shortlists per share, so it re-ranks
P shortlists (at least as many candidates as one index would).

`gather` is a collective, local array [...] -> [P, ...]: `process_gather` (jax's multihost all-gather) in a
multi-process job; tests pass a thread-barrier gather to run P shards in one process.
"""

import dataclasses
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from hivlp_jax import errors
from hivlp_jax import ranking
from hivlp_jax import retrieval

Gather = Callable[[np.ndarray], np.ndarray]


def process_gather(array: np.ndarray) -> np.ndarray:
  """[...] on every process -> [processes, ...] on every process (`multihost_utils.process_allgather`)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(array))


@dataclasses.dataclass(frozen=True)
class Shard:
  """This process's place among `count` shards, and the collective that joins them."""
  index: int
  count: int
  gather: Gather

  def __post_init__(self):
    if not 0 <= self.index < self.count:
      raise errors.InputError(f'Shard {self.index} of {self.count}: a gallery shard count must match the '
                              'processes, and the index be one of them.')

  def bounds(self, num_items: int) -> tuple[int, int]:
    """[start, stop) of this shard's items: contiguous, sizes differ by at most one."""
    base, extra = divmod(num_items, self.count)
    start = self.index * base + min(self.index, extra)
    return start, start + base + (self.index < extra)

  def all_rows(self, local: np.ndarray, num_items: int) -> np.ndarray:
    """Every shard's `local` rows [n_i, ...] joined in shard order -> [num_items, ...] (padded to equal
    sizes for the gather, padding dropped)."""
    sizes = [stop - start for start, stop in (dataclasses.replace(self, index=i).bounds(num_items)
                                              for i in range(self.count))]
    padded = np.zeros((max(sizes),) + local.shape[1:], local.dtype)
    padded[:len(local)] = local
    gathered = self.gather(padded)
    return np.concatenate([gathered[i][:size] for i, size in enumerate(sizes)])


def for_this_process(gather: Optional[Gather] = None) -> Shard:
  """The shard of jax.process_index() among jax.process_count() (gather default `process_gather`)."""
  return Shard(jax.process_index(), jax.process_count(), gather or process_gather)


def rank_queries(index: retrieval.Index, shard: Shard, num_items: int, queries: np.ndarray,
                 positive_ids: np.ndarray, k: int, block: Optional[int] = None) -> ranking.Ranking:
  """`ranking.rank_queries` of a gallery of `num_items` sharded over processes (see the module docstring).

  Args:
    index: this process's index over its items `shard.bounds(num_items)` (local ids 0..n-1).
    queries: [Q, D], the same on every process; positive_ids: int [Q, P] global item ids (-1: padding).
    k: top-k kept; block: queries per block, the same on every process (default from `num_items`).
  Returns:
    The `ranking.Ranking` of the whole gallery, on every process.
  """
  start, _ = shard.bounds(num_items)
  out = ranking.Ranking(np.empty(len(queries), np.int64), np.empty((len(queries), k), np.float32),
                        np.empty((len(queries), k), np.int64))
  for rows, scores, ids in ranking.scored_blocks(index, queries, block or retrieval.block_rows(num_items)):
    scores = np.asarray(scores, np.float32)
    ids = (np.broadcast_to(np.arange(scores.shape[1]), scores.shape) if ids is None else np.asarray(ids))
    ids = np.where(ids >= 0, ids + start, -1)  # Global ids.
    positives = ranking.positive_mask(ids, positive_ids[rows], scores.shape[1])
    top_scores, top_ids = retrieval.top_k(scores, k, ids)
    best = ranking.best_positive_scores(scores, positives)
    # The top-k scores and the best positive score in one gather [P, q, k + 1]; ids as int32 (jax's default
    # width; -1 pads stay -1).
    gathered = shard.gather(np.concatenate([top_scores, best.astype(np.float32)[:, None]], axis=1))
    gathered_scores, best = gathered[:, :, :k], gathered[:, :, k].max(axis=0)  # [P, q, k], [q]
    gathered_ids = shard.gather(top_ids.astype(np.int32)).astype(np.int64)
    count = shard.gather(ranking.negatives_at_least(scores, positives, best).astype(np.int32)).sum(axis=0)
    out.ranks[rows] = ranking.ranks_from_counts(count.astype(np.int64), best, num_items)
    out.scores[rows], out.ids[rows] = merge_top_k(list(gathered_scores), list(gathered_ids), k)
  return out


def merge_top_k(scores: Sequence[np.ndarray], ids: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
  """The global top-k of per-shard top-k lists: scores / global ids [q, k_i] per shard -> float32 [q, k],
  int64 [q, k] (`retrieval.top_k`; ties go to the lower global id, as one index over the whole gallery
  breaks them; -1 ids are empty slots)."""
  merged_scores = np.concatenate([np.asarray(s, np.float32) for s in scores], axis=1)
  merged_ids = np.concatenate([np.asarray(i, np.int64) for i in ids], axis=1)
  # Columns in id order (empty slots last), so that top_k's tie rule (the lower column) is the lower id's.
  by_id = np.argsort(np.where(merged_ids < 0, np.iinfo(np.int64).max, merged_ids), axis=1, kind='stable')
  return retrieval.top_k(np.take_along_axis(merged_scores, by_id, axis=1), k,
                         np.take_along_axis(merged_ids, by_id, axis=1))
