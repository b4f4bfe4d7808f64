"""The rows of benchmarks/retrieval.py: how each method builds its index, searches it, and which knobs a
recall target tunes (`Method.rows`, searched by `tuning.cheapest_setting`).

Knobs (a setting is a dict of them; None: the method's fixed default):
  faiss_ivf      nprobe (default: --ivf_nprobe_fraction of the lists)
  faiss_ivfpq    nprobe x k_factor: `IVF{n},PQ{D/2}x4fs,RFlat`, fast-scan PQ (4-bit codes scanned in SIMD
                 registers) whose k_factor * k best are re-scored exactly by the flat refine index
  faiss_hnsw     efSearch (`HNSW32,Flat`; build cost grows fast with G: --hnsw_max_size)
  scann          leaves_to_search x reorder (a tree from 20k items; brute force below has no knobs)
  two_stage, funnel   leaves_to_search x shortlist (`tuning.index_rows`)
Exact methods have none.
"""

import dataclasses
import functools
import tempfile
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from hivlp_jax import coarse_to_fine
from hivlp_jax import files
from hivlp_jax import retrieval
from hivlp_jax import tuning

K = tuning.RECALL_K
REFINE_FACTORS = (1, 2, 4, 8, 16, 32, 64, 128)  # faiss_ivfpq k_factor rows.
REORDERS = (100, 150, 200, 300, 450, 700, 1000)  # scann re-scoring rows.


@dataclasses.dataclass
class Method:
  name: str
  build: Callable[[np.ndarray], Any]  # gallery [G, D] -> index
  search: Callable[[Any, np.ndarray, Optional[dict]], np.ndarray]  # index, queries [Q, D], setting -> ids [Q, K]
  nbytes: Callable[[Any], int]
  rows: Optional[Callable[[Any], list[list[dict]]]] = None  # index -> its settings grid (None: no knobs)


def directory_bytes(path: str) -> int:
  return sum((root / name).stat().length for root, _, names in files.path(path).walk() for name in names)


def scann_bytes(searcher) -> int:
  """Size of the serialised searcher: its hashed codes, tree, codebooks and float32 re-scoring data."""
  with tempfile.TemporaryDirectory() as tmp:
    searcher.serialize(tmp)
    return directory_bytes(tmp)


def exact_numpy() -> Method:
  return Method('exact_numpy', retrieval.ExactIndex, lambda index, q, _: index.search(q, K)[1],
                lambda index: index.gallery_t.nbytes)


@functools.partial(jax.jit, static_argnums=2)
def _jax_top_k(q: jnp.ndarray, g: jnp.ndarray, k: int) -> jnp.ndarray:
  q = q / jnp.sqrt(jnp.sum(q * q, axis=-1, keepdims=True) + 1e-6)
  return jax.lax.top_k(q @ g.T, k)[1]


def exact_jax(chunk: int = 64) -> Method:
  def search(g, q, _):
    if len(q) == 1:
      return np.asarray(_jax_top_k(jnp.asarray(q), g, K))
    out = []
    for start in range(0, len(q), chunk):  # Fixed chunk shape: one compilation.
      block = q[start:start + chunk]
      padded = np.pad(block, ((0, chunk - len(block)), (0, 0)), constant_values=1.0)
      out.append(np.asarray(_jax_top_k(jnp.asarray(padded), g, K))[:len(block)])
    return np.concatenate(out)
  return Method('exact_jax', lambda g: jax.device_put(retrieval.normalized_prefix_np(g, g.shape[1])), search,
                lambda g: g.nbytes)


def _normalized(x: np.ndarray) -> np.ndarray:
  return retrieval.normalized_prefix_np(x, x.shape[1])


def _num_lists(num_items: int) -> int:
  return max(1, round(np.sqrt(num_items)))


def _default_nprobe(nprobe_fraction: float, num_lists: int) -> int:
  return max(1, int(np.ceil(nprobe_fraction * num_lists)))


def _train_ivf(index, g: np.ndarray, num_lists: int) -> None:
  # 40 points per list is above FAISS's minimum (39) and keeps k-means at 1M affordable.
  sample = np.random.default_rng(0).choice(len(g), min(len(g), 40 * num_lists), replace=False)
  index.train(g[np.sort(sample)])
  index.add(g)


def faiss_flat() -> Method:
  import faiss  # pylint: disable=g-import-not-at-top

  def build(g):
    index = faiss.IndexFlatIP(g.shape[1])
    index.add(_normalized(g))
    return index
  return Method('faiss_flat', build, lambda index, q, _: index.search(_normalized(q), K)[1],
                lambda index: index.ntotal * index.d * 4)


def faiss_ivf(nprobe_fraction: float) -> Method:
  """IVF-Flat over sqrt(G) lists; default nprobe: `nprobe_fraction` of them."""
  import faiss  # pylint: disable=g-import-not-at-top

  def build(g):
    g = _normalized(g)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(g.shape[1]), g.shape[1], _num_lists(len(g)),
                               faiss.METRIC_INNER_PRODUCT)
    _train_ivf(index, g, index.nlist)
    return index

  def search(index, q, setting):
    index.nprobe = (setting or {}).get('nprobe') or _default_nprobe(nprobe_fraction, index.nlist)
    return index.search(_normalized(q), K)[1]
  return Method('faiss_ivf', build, search,
                # Vectors and 8-byte ids in the lists, plus the centroids.
                lambda index: index.ntotal * (index.d * 4 + 8) + index.nlist * index.d * 4,
                lambda index: [[{'nprobe': n} for n in tuning.geometric_grid(index.nlist)]])


def faiss_ivfpq(nprobe_fraction: float) -> Method:
  """`IVF{sqrt G},PQ{D/2}x4fs,RFlat`: FAISS's fast-scan PQ with an exact refine; default nprobe as
  faiss_ivf and k_factor 16."""
  import faiss  # pylint: disable=g-import-not-at-top

  def build(g):
    g = _normalized(g)
    index = faiss.index_factory(g.shape[1], f'IVF{_num_lists(len(g))},PQ{g.shape[1] // 2}x4fs,RFlat',
                                faiss.METRIC_INNER_PRODUCT)
    _train_ivf(index, g, _num_lists(len(g)))
    return index

  def search(index, q, setting):
    setting = setting or {}
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = setting.get('nprobe') or _default_nprobe(nprobe_fraction, ivf.nlist)
    index.k_factor = setting.get('k_factor', 16)
    return index.search(_normalized(q), K)[1]

  def rows(index):
    nprobes = tuning.geometric_grid(faiss.extract_index_ivf(index).nlist)
    return [[{'k_factor': f, 'nprobe': n} for n in nprobes] for f in REFINE_FACTORS]

  def nbytes(index):  # 4-bit codes of D/2 sub-vectors and ids, the centroids, the refine copy.
    ivf = faiss.extract_index_ivf(index)
    return index.ntotal * (index.d // 4 + 8 + index.d * 4) + ivf.nlist * index.d * 4
  return Method('faiss_ivfpq_fs_refine', build, search, nbytes, rows)


def faiss_hnsw() -> Method:
  """`HNSW32,Flat` (efConstruction 40, FAISS's default); default efSearch 64."""
  import faiss  # pylint: disable=g-import-not-at-top

  def build(g):
    index = faiss.IndexHNSWFlat(g.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.add(_normalized(g))
    return index

  def search(index, q, setting):
    index.hnsw.efSearch = (setting or {}).get('efSearch', 64)
    return index.search(_normalized(q), K)[1]
  return Method('faiss_hnsw32', build, search,
                lambda index: index.ntotal * (index.d * 4 + 2 * 32 * 4),  # Vectors and level-0 links.
                lambda index: [[{'efSearch': e} for e in tuning.geometric_grid(2048, smallest=K)]])


def scann_full(settings: retrieval.ScannSettings) -> Method:
  """ScaNN over the normalised full vectors (a tree with hashing and re-scoring from 20k items)."""
  def build(g):
    return retrieval.build_scann(_normalized(g), K, settings), len(g)

  def search(index, q, setting):
    setting = setting or {}
    return retrieval.scann_search(index[0], _normalized(q), K, pre_reorder=setting.get('reorder'),
                                  leaves_to_search=setting.get('leaves_to_search'), threads=settings.threads)[1]

  def rows(index):
    resolved = settings.resolve(index[1], K)
    if not resolved.num_leaves:
      return []
    leaves = tuning.geometric_grid(resolved.num_leaves)
    return [[{'reorder': r, 'leaves_to_search': n} for n in leaves] for r in REORDERS if r <= index[1]]
  return Method('scann', build, search, lambda index: scann_bytes(index[0]), rows)


def coarse_to_fine_method(mode) -> Method:
  """A row of a `coarse_to_fine.TwoStageSearch` or `FunnelSearch`."""
  def nbytes(index):
    if isinstance(index, coarse_to_fine.ScannPrefixIndex):  # ScaNN holds the vectors it re-scores.
      return scann_bytes(index.searcher)
    return (scann_bytes(index.searcher) + index.gallery.nbytes
            + sum(v.nbytes for v in index.inverse_norms.values()))

  def search(index, q, setting):
    return (index.with_knobs(**setting) if setting else index).search(q, K)[1]
  return Method(mode.name, mode.build, search, nbytes, tuning.index_rows)
