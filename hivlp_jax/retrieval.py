"""Retrieval: a gallery indexed once, then searched for each query's top-k.

A retrieval mode is a configuration of an index: `mode.build(gallery)` takes the gallery's full-dim
(unnormalised, nested-head) embeddings [G, D] and returns an `Index`, whose `search(queries, k)` gives
each query's top-k (scores, ids) and whose `candidates(queries)` gives every item it scores for each
query (the whole gallery for exact search, the last shortlist for coarse-to-fine), which the evaluator
ranks a block of queries at a time (`evaluate.rank_queries`), so exact and approximate search are
measured by the same code and no [Q, G] matrix is ever held. Modes: `ExactSearch` here; the
coarse-to-fine `coarse_to_fine.TwoStageSearch` (backends 'rerank', 'truncate' and 'auto') and
`coarse_to_fine.FunnelSearch`.

This module also holds what every index shares: the normalised prefix, the one top-k (numpy, or
`jax.lax.top_k` for device arrays), the query block size, and ScaNN's settings, build and search.
"""

import dataclasses
import math
import os
from typing import Optional, Protocol, Union

import jax
import jax.numpy as jnp
import numpy as np

from hivlp_jax import errors
from hivlp_jax.models import matryoshka

# How `coarse_to_fine.TwoStageSearch` runs its two stages (see there).
BACKENDS = ('auto', 'rerank', 'truncate')
# Bytes of one query block's float32 scores [block, G] (exact search, evaluation). Ranking a block makes a
# few temporaries of about this size, so the evaluator's peak stays within tens of MiB of its embeddings.
BLOCK_BYTES = 4 << 20
# XLA's CPU matmul takes another path below about 48 rows, whose float32 roundings differ (measured): blocks
# of at least 64 rows score bit for bit as the one [Q, G] matmul of the dense evaluator did.
MIN_BLOCK_ROWS = 64

Scores = Union[np.ndarray, jax.Array]  # jax.Array: on an accelerator, where exact search leaves its scores.


class Index(Protocol):
  """A gallery of `num_items`, indexed by a `RetrievalMode`."""
  num_items: int

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """queries [Q, D] -> scores float32 [Q, k] (descending) and ids int64 [Q, k]; -inf / -1 in the
    slots beyond what the index retrieved."""

  def candidates(self, queries: np.ndarray) -> tuple[Scores, Optional[np.ndarray]]:
    """queries [Q, D] -> every item the index scores for each query, in no particular order: scores
    float32 [Q, C] and ids int64 [Q, C] (-inf / -1 in empty slots). Exact search scores the whole
    gallery and returns ids None (column j is item j); coarse-to-fine indexes their last shortlist. Any
    other item scores -inf. [Q, C] is held at once: callers pass blocks of queries (`block_rows`)."""


class RetrievalMode(Protocol):
  """A configuration of an index; `name` labels its results."""
  name: str

  def build(self, gallery: np.ndarray) -> Index:
    """gallery [G, D] (full dim, unnormalised) -> its index."""


def normalized_prefix_np(embeddings: np.ndarray, dim: int) -> np.ndarray:
  """[..., D] -> float32 [..., dim]: `matryoshka.normalized_prefix` of the embeddings as float32 numpy."""
  return matryoshka.normalized_prefix(np.asarray(embeddings, np.float32), dim)


def block_rows(num_items: int, max_block_bytes: Optional[int] = None) -> int:
  """Queries per block whose float32 scores over `num_items` fit `max_block_bytes` (default BLOCK_BYTES),
  and at least MIN_BLOCK_ROWS."""
  return max(MIN_BLOCK_ROWS, (max_block_bytes or BLOCK_BYTES) // (4 * max(1, num_items)))


def top_k(scores: Scores, k: int, ids: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
  """The k best of each row, sorted descending; ties, also at the k-th place, go to the lower column, and
  NaN ranks with -inf (its score is returned as NaN).

  The one top-k: numpy for host arrays; `jax.lax.top_k` where `scores` is a device array (only the
  [Q, k] result leaves the device). Both give the same ids.

  Args:
    scores: [Q, K]; ids: int [Q, K], what each column is (default: the column numbers).
  Returns:
    numpy scores float32 [Q, k] and ids int64 [Q, k]; when K < k the last columns are -inf / -1.
  """
  if isinstance(scores, jax.Array):
    return _top_k_on_device(scores, k, ids)
  scores = np.asarray(scores, np.float32)
  key = np.where(np.isnan(scores), -np.inf, scores) if np.isnan(scores).any() else scores
  found, width = min(k, scores.shape[1]), scores.shape[1]
  columns = np.broadcast_to(np.arange(width), scores.shape)
  if found < width:  # Only the k best are sorted. np.partition: a float32 copy, not int64 indices.
    kth = np.partition(key, width - found, axis=1)[:, width - found:width - found + 1]  # The k-th best.
    rows, candidates = np.nonzero(key >= kth)  # At least `found` a row: usually exactly that many.
    if len(rows) <= 4 * found * len(key):
      # By row, then score descending, then column ascending (ties to the lower column); `found` a row.
      order = np.lexsort((candidates, -key[rows, candidates], rows))
      starts = np.searchsorted(rows[order], np.arange(len(key)))
      columns = candidates[order][starts[:, None] + np.arange(found)[None, :]]
    else:  # Many ties at the k-th place (e.g. rows of -inf): the lowest columns among them.
      above, tied = key > kth, key == kth
      need = found - above.sum(axis=1, keepdims=True)
      chosen = above | (tied & (np.cumsum(tied, axis=1, dtype=np.int32) <= need))
      columns = np.nonzero(chosen)[1].reshape(-1, found)  # Exactly `found` a row, in column order.
  order = np.argsort(-np.take_along_axis(key, columns, axis=1), axis=1, kind='stable')  # [Q, k]: cheap.
  columns = np.take_along_axis(columns, order, axis=1)
  top_scores = np.take_along_axis(scores, columns, axis=1)
  top_ids = columns if ids is None else np.take_along_axis(np.asarray(ids), columns, axis=1)
  pad = ((0, 0), (0, k - found))
  return (np.pad(top_scores, pad, constant_values=-np.inf),
          np.pad(top_ids, pad, constant_values=-1).astype(np.int64))


def _top_k_on_device(scores: jax.Array, k: int, ids) -> tuple[np.ndarray, np.ndarray]:
  """`top_k` of a device array [Q, K] with `jax.lax.top_k` (which puts the lower column first on ties)."""
  found = min(k, scores.shape[1])
  _, best = jax.lax.top_k(jnp.where(jnp.isnan(scores), -jnp.inf, scores), found)
  top_scores = np.asarray(jnp.take_along_axis(scores, best, axis=1), np.float32)
  best = np.asarray(best, np.int64)
  top_ids = best if ids is None else np.take_along_axis(np.asarray(ids, np.int64), best, axis=1)
  pad = ((0, 0), (0, k - found))
  return np.pad(top_scores, pad, constant_values=-np.inf), np.pad(top_ids, pad, constant_values=-1)


def shortlist_recall(candidate_ids: np.ndarray, exact_top: np.ndarray) -> float:
  """Fraction of the exact top-n (usually the full-dim top-10) found in each query's shortlist.

  Args:
    candidate_ids: int [Q, K], a shortlist per query (-1 marks an empty slot).
    exact_top: int [Q, n], the exact neighbours per query.
  Returns:
    The mean over queries of |shortlist & exact| / n.
  """
  candidate_ids, exact_top = np.asarray(candidate_ids), np.asarray(exact_top)
  found = (exact_top[:, :, None] == candidate_ids[:, None, :]).any(axis=2)  # [Q, n]
  return float(found.mean())


def check_target_recall(target_recall: float, name: str = 'target_recall') -> None:
  """A recall@10 to tune a search to (`tuning`) must be in (0, 1]."""
  if not 0 < target_recall <= 1:
    raise errors.InputError(f'{name}={target_recall} must be in (0, 1]: the recall@10 to reach (0 in the config: '
                            'no tuning).')


# ----------------------------------------------------------------------------------------------------
# Exact search.


class ExactIndex:
  """Exhaustive search over a gallery's normalised `dim`-prefixes (normalised once, here).

  Scored in JAX (`matryoshka.normalized_prefix`, then one matmul per query block), as the evaluator has
  always scored exact search, so its recall figures stay bit for bit what they were. On an accelerator
  the gallery and each block's scores stay on the device and only the top-k comes back.
  """

  def __init__(self, gallery: np.ndarray, dim: Optional[int] = None):
    """gallery [G, D] unnormalised; dim: the prefix searched (the full dim by default)."""
    self.dim = gallery.shape[1] if dim is None else dim
    self.num_items = gallery.shape[0]
    # [dim, G], what is scored: transposed once here, not once per block (the scores are what they were);
    # normalised in row chunks (each row's value is the same) so that the build holds ~2 copies, not 4.
    chunks = [matryoshka.normalized_prefix(jnp.asarray(gallery[start:start + 65536]), self.dim).T
              for start in range(0, self.num_items, 65536)]
    self.gallery_t = jnp.concatenate(chunks, axis=1) if len(chunks) != 1 else chunks[0]
    del chunks
    self._on_host = jax.default_backend() == 'cpu'  # There numpy ranks the scores (no device copy to avoid).

  def candidates(self, queries: np.ndarray) -> tuple[Scores, None]:
    """queries [Q, D] -> scores float32 [Q, G] of every item (numpy on CPU, a device array on an
    accelerator) and ids None: column j is item j. Pass a block of queries (`block_rows`)."""
    scores = matryoshka.normalized_prefix(jnp.asarray(queries), self.dim) @ self.gallery_t
    return (np.asarray(scores) if self._on_host else scores), None

  def search(self, queries: np.ndarray, k: int, chunk_size: Optional[int] = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """queries [Q, D] -> scores float32 [Q, k] (descending) and ids int64 [Q, k]; k > G pads with -inf / -1.

    Chunked over queries (`chunk_size`, default `block_rows(G)`): a chunk's [c, G] scores bound the memory.
    """
    chunk_size = chunk_size or block_rows(self.num_items)
    scores = np.empty((queries.shape[0], k), np.float32)
    ids = np.empty((queries.shape[0], k), np.int64)
    for start in range(0, queries.shape[0], chunk_size):
      chunk = slice(start, start + chunk_size)
      scores[chunk], ids[chunk] = top_k(self.candidates(queries[chunk])[0], k)
    return scores, ids


class ExactSearch:
  """Exact search at one nested dim: the cosine of the normalised `dim`-prefixes, every item scored."""

  def __init__(self, dim: int):
    self.dim = dim
    self.name = f'exact_dim{dim}'

  def build(self, gallery: np.ndarray) -> ExactIndex:
    return ExactIndex(gallery, self.dim)


# ----------------------------------------------------------------------------------------------------
# ScaNN.


@dataclasses.dataclass(frozen=True)
class ScannSettings:
  """How a ScaNN dot-product searcher is built; None fields get defaults from the gallery size.

  For G items and k neighbours per query (`resolve` fills these in):
    brute_force_below: galleries smaller than this (default 20,000) are scored exhaustively in
      float32 (`score_brute_force()`): exact, needs no training, and cheap at that size.
      Larger ones get a k-means tree, anisotropic hashing (`score_ah(2,
      anisotropic_quantization_threshold=0.2)`) and exact float32 re-scoring of the best hashed
      candidates (`reorder`).
    num_leaves: tree partitions, default round(sqrt(G)) (about sqrt(G) items per leaf).
    leaves_to_search: leaves scanned per query, default the larger of 10% of the leaves and enough
      leaves to scan 20 * k items. ScaNN's published GloVe setting scans 5% (100 of 2,000 leaves for
      1.2M items); on the unclustered synthetic gallery of benchmarks/retrieval.py (G = 100k, D = 768)
      5% kept 0.78 of the exact top-10 and 10% 0.87-0.91, and a 1,000 shortlist at 64 dims needed
      20% for 0.98 (hence the 20 * k rule).
    training_sample_size: items sampled to train the tree and hashing, default min(G, 250,000).
    reorder: hashed candidates re-scored exactly, default max(200, 2 * k).
    threads: threads for training and batched search; 0 lets ScaNN use every core and splits a batch
      of queries over them (`search_batched_parallel`), 1 trains and searches in the calling thread.
      It does not change the index (a saved index ignores it).
  A resolved brute-force setting has 0 in the four tree fields.
  """
  brute_force_below: int = 20_000
  num_leaves: Optional[int] = None
  leaves_to_search: Optional[int] = None
  training_sample_size: Optional[int] = None
  reorder: Optional[int] = None
  threads: int = 0

  @classmethod
  def from_config(cls, scann_config) -> 'ScannSettings':
    """From config.eval.scann, where 0 means the default for the gallery size (None here)."""
    fields = ('num_leaves', 'leaves_to_search', 'training_sample_size', 'reorder')
    for name in fields + ('brute_force_below', 'threads'):
      if scann_config[name] < 0:
        raise errors.InputError(f'config.eval.scann.{name}={scann_config[name]} must be >= 0 (0: the default).')
    target = scann_config.get('target_recall', 0.0)
    if target:
      check_target_recall(target, 'config.eval.scann.target_recall')
    return cls(brute_force_below=scann_config.brute_force_below, threads=scann_config.threads,
               **{name: scann_config[name] or None for name in fields})

  def brute_force(self, num_items: int) -> bool:
    return num_items < self.brute_force_below

  def resolve(self, num_items: int, num_neighbors: int) -> 'ScannSettings':
    """These settings with every None replaced by its default for `num_items` and `num_neighbors`."""
    if self.brute_force(num_items):
      return dataclasses.replace(self, num_leaves=0, leaves_to_search=0, training_sample_size=0, reorder=0)
    num_leaves = self.num_leaves or max(1, min(num_items, round(math.sqrt(num_items))))
    leaves_to_search = self.leaves_to_search or min(num_leaves, max(
        math.ceil(0.1 * num_leaves), math.ceil(20 * num_neighbors * num_leaves / num_items)))
    return dataclasses.replace(
        self, num_leaves=num_leaves, leaves_to_search=leaves_to_search,
        training_sample_size=self.training_sample_size or min(num_items, 250_000),
        reorder=self.reorder or min(num_items, max(200, 2 * num_neighbors)))


def build_scann(database: np.ndarray, num_neighbors: int, settings: Optional[ScannSettings] = None,
                truncate_dim: Optional[int] = None):
  """Builds a ScaNN dot-product searcher over `database` (used as given: normalise it first).

  Args:
    database: float32 [G, d].
    num_neighbors: k, the default number of neighbours a search returns.
    settings: see `ScannSettings` for the defaults chosen from G.
    truncate_dim: ScaNN's Matryoshka mode: the tree and the hashing see only the first `truncate_dim`
      coordinates, re-scoring (`reorder`) uses all d. Always a tree (the brute-force threshold is
      ignored: exhaustive scoring would use all d anyway); truncate_dim == d is a plain tree (ScaNN's
      truncation needs fewer dims than d).
  Returns:
    A `scann_ops_pybind.ScannSearcher`.
  """
  import scann  # pylint: disable=g-import-not-at-top  # Imports TensorFlow (~3 s, 700 MiB): only when used.
  settings = settings or ScannSettings()
  database = np.ascontiguousarray(database, np.float32)
  num_items = database.shape[0]
  builder = scann.scann_ops_pybind.builder(database, num_neighbors, 'dot_product')
  builder.set_n_training_threads(settings.threads)
  if truncate_dim is not None and not 0 < truncate_dim <= database.shape[1]:
    raise errors.InputError(f'truncate_dim={truncate_dim} must be in [1, {database.shape[1]}].')
  if truncate_dim is None and settings.brute_force(num_items):
    searcher = builder.score_brute_force().build()
  else:
    if truncate_dim is not None:
      settings = dataclasses.replace(settings, brute_force_below=0)
      if truncate_dim < database.shape[1]:
        builder = builder.truncate(truncate_dim)
    s = settings.resolve(num_items, num_neighbors)
    searcher = (builder.tree(s.num_leaves, s.leaves_to_search, training_sample_size=s.training_sample_size)
                .score_ah(2, anisotropic_quantization_threshold=0.2).reorder(s.reorder).build())
  if settings.threads != 1:
    searcher.set_num_threads(settings.threads or os.cpu_count() or 1)
  return searcher


def scann_search(searcher, queries: np.ndarray, k: int, pre_reorder: Optional[int] = None,
                 leaves_to_search: Optional[int] = None, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """ScaNN top-k with its padding made explicit.

  Args:
    searcher: a ScaNN searcher; queries: float32 [Q, d] (normalised like its database).
    k: neighbours per query; pre_reorder, leaves_to_search: override the searcher's own (None: keep).
    threads: as `ScannSettings.threads` (1: search in this thread).
  Returns:
    scores float32 [Q, k] (descending dot products) and indices int64 [Q, k]. When ScaNN finds fewer
    than k items (a tree whose searched leaves hold fewer) the rest are -inf and -1 (ScaNN pads with
    NaN and 0).
  """
  queries = np.ascontiguousarray(queries, np.float32)
  search = searcher.search_batched if threads == 1 else searcher.search_batched_parallel
  indices, scores = search(queries, final_num_neighbors=k, pre_reorder_num_neighbors=pre_reorder,
                           leaves_to_search=leaves_to_search)
  indices, scores = np.asarray(indices, np.int64), np.asarray(scores, np.float32)
  missing = np.isnan(scores)  # Batched search always returns k columns, NaN-padded (k > G too).
  return np.where(missing, -np.inf, scores).astype(np.float32), np.where(missing, -1, indices)

