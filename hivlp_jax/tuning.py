"""Search tuned to a recall target: the cheapest setting of an index's knobs whose recall@10 reaches it.

An approximate index trades recall for speed through its knobs (ScaNN: the leaves searched per query and
the shortlist re-scored exactly; FAISS IVF: nprobe and the refine factor; HNSW: efSearch). A fixed setting
(say, 10% of the leaves) is too slow on clustered data and too lossy on uniform data. `cheapest_setting`
measures a grid of settings on a held-out sample of queries with exact ground truth: along each row of the
grid (settings of growing cost, hence growing recall) it bisects for the first that reaches the target,
then times each row's pick and keeps the fastest. `tune_index` does this for the coarse-to-fine indexes
(`coarse_to_fine.CoarseToFineIndex`, `ScannPrefixIndex`); benchmarks/retrieval.py does it for its FAISS
rows with the same function.
"""

import dataclasses
import time
from typing import Callable, Optional, Sequence

from absl import logging
import numpy as np

from hivlp_jax import retrieval

RECALL_K = 10  # The recall that is tuned: recall@10 against the exact top-10.
# First-stage shortlists tried (those >= RECALL_K and <= the gallery size); about 1.5x apart.
SHORTLISTS = (10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 450, 700, 1000, 1500, 2000)

Setting = dict  # Knob name -> value, e.g. {'shortlist': 300, 'leaves_to_search': 12}.


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
  """A tuned setting and what it measured on the tuning queries."""
  setting: Setting
  recall_at_10: float
  queries_per_s: float  # Batched search of the tuning queries, the best of `repeats` runs.
  target_recall: float
  reached: bool  # False: no setting reached the target; `setting` is the one of highest recall.
  settings_tried: int

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def geometric_grid(largest: int, smallest: int = 1, ratio: float = 1.5) -> list[int]:
  """Distinct integers from `smallest` to `largest` (both included), about `ratio` apart."""
  values, value = [], float(smallest)
  while value < largest:
    values.append(int(round(value)))
    value = max(value * ratio, value + 1)
  return sorted(set(values + [largest]))


def cheapest_setting(rows: Sequence[Sequence[Setting]], search: Callable[[Setting, np.ndarray], np.ndarray],
                     queries: np.ndarray, exact_top: np.ndarray, target_recall: float,
                     repeats: int = 3) -> OperatingPoint:
  """The fastest setting whose recall@10 on `queries` reaches `target_recall`.

  Args:
    rows: settings; within a row, of growing cost and recall (bisected: recall is assumed monotone).
    search: (setting, queries [Q, D]) -> ids int [Q, >= 10] of each query's best items, best first.
    queries: [Q, D], held out from whatever the index is evaluated on; exact_top: int [Q, 10], their exact
      top-10 (the ground truth).
    target_recall: the recall@10 to reach; repeats: timed runs per candidate (the fastest counts).
  Returns:
    The operating point. When no setting reaches the target, the one of highest recall (reached False).
  """
  retrieval.check_target_recall(target_recall)
  recalls: dict[tuple, float] = {}

  def recall(setting: Setting) -> float:
    key = tuple(sorted(setting.items()))
    if key not in recalls:
      recalls[key] = retrieval.shortlist_recall(search(setting, queries)[:, :RECALL_K], exact_top[:, :RECALL_K])
    return recalls[key]

  picks = []
  for row in rows:
    lo, hi = 0, len(row) - 1
    if not row or recall(row[hi]) < target_recall:
      continue
    while lo < hi:  # The first setting of the row that reaches the target.
      mid = (lo + hi) // 2
      if recall(row[mid]) >= target_recall:
        hi = mid
      else:
        lo = mid + 1
    picks.append(row[lo])
  if not picks:
    best = max((s for row in rows for s in row[-1:]), key=recall)
    logging.warning('No setting reached recall@10 %.3f (best %.3f with %s).', target_recall, recall(best), best)
    return OperatingPoint(best, recall(best), _queries_per_s(search, best, queries, repeats), target_recall,
                          False, len(recalls))
  speeds = [_queries_per_s(search, s, queries, repeats) for s in picks]
  best = int(np.argmax(speeds))
  return OperatingPoint(picks[best], recall(picks[best]), speeds[best], target_recall, True, len(recalls))


def _queries_per_s(search, setting: Setting, queries: np.ndarray, repeats: int) -> float:
  seconds = []
  for _ in range(max(1, repeats)):
    start = time.perf_counter()
    search(setting, queries)
    seconds.append(time.perf_counter() - start)
  return len(queries) / min(seconds)


def exact_top_k(gallery: np.ndarray, queries: np.ndarray, dim: Optional[int] = None, k: int = RECALL_K
                ) -> np.ndarray:
  """int [Q, k]: each query's exact top-k by the cosine of the normalised `dim`-prefixes (default full)."""
  return retrieval.ExactIndex(gallery, dim).search(queries, k)[1]


def index_rows(index, shortlists: Sequence[int] = SHORTLISTS) -> list[list[Setting]]:
  """The settings grid of a coarse-to-fine index: a row per shortlist, along it the leaves searched (a
  geometric grid up to all of them; one setting for a brute-force searcher, which has no leaves)."""
  sizes = [s for s in shortlists if RECALL_K <= s <= index.num_items] or [min(index.num_items, RECALL_K)]
  if not index.num_leaves:  # Recall grows with the shortlist alone: one row.
    return [[{'shortlist': s} for s in sizes]]
  leaves = geometric_grid(index.num_leaves)
  return [[{'shortlist': s, 'leaves_to_search': n} for n in leaves] for s in sizes]


def tune_index(index, queries: np.ndarray, exact_top: np.ndarray, target_recall: float,
               shortlists: Sequence[int] = SHORTLISTS, repeats: int = 3):
  """A coarse-to-fine index at its cheapest setting reaching `target_recall` (see `cheapest_setting`).

  Args:
    index: a `coarse_to_fine.CoarseToFineIndex` or `ScannPrefixIndex`.
    queries: [Q, D] held-out queries; exact_top: int [Q, 10], their exact top-10 at the index's final dim.
  Returns:
    (the index with the chosen knobs, the `OperatingPoint`).
  """
  def search(setting: Setting, q: np.ndarray) -> np.ndarray:
    return index.with_knobs(**setting).search(q, RECALL_K)[1]
  point = cheapest_setting(index_rows(index, shortlists), search, queries, exact_top, target_recall, repeats)
  logging.info('Tuned to recall@10 %.3f: %s (recall %.3f, %.0f queries/s on %d tuning queries, %d settings tried).',
               target_recall, point.setting, point.recall_at_10, point.queries_per_s, len(queries),
               point.settings_tried)
  return index.with_knobs(**point.setting), point
