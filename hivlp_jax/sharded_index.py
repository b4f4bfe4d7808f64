"""Saved gallery indexes sharded over processes: one index directory per contiguous share, one manifest.

A sharded index directory holds
  manifest.json                 {'format', 'kind': 'sharded', 'num_items', 'num_shards', 'shards'}, where
                                each of `shards` is {'name', 'start', 'stop', 'fingerprint', 'manifest_sha256'}:
                                the shard's rows [start, stop) of the gallery, its embeddings' fingerprint
                                and the sha256 of its own manifest;
  shard_00000-of-00003/ ...     each an index directory of `index_store` (its own manifest, embeddings.npy
                                and scann/) over its rows `gallery_shards.Shard.bounds`.
One shard is today's single index directory: `load_or_build(num_shards=1)` is `index_store.load_or_build`.

In a multi-process job each process passes its own rows, builds (or loads) its own shard, and process 0
writes the top-level manifest once every process has written its shard (a barrier, then another); the
shard count must be the process count. A single process may build and serve every shard in turn: its
`index()` searches each shard and merges their top-k with global ids (`ShardedIndex`). A shard is stale or
damaged by `index_store`'s rules (and rebuilt, the shard named in `stale_reasons`); the top-level manifest
is stale when its shard count, gallery size or row ranges differ (every shard is then rebuilt, and the
shard directories of another layout removed). `load` (no embeddings) checks the shards against the
top-level manifest and names a missing or damaged one.

  stored = sharded_index.load_or_build('runs/x/index', gallery, step, coarse_dim=16, shortlist=1000,
                                       num_shards=3)
  scores, ids = stored.index().search(queries, 10)  # Global ids, as one index over the gallery.
"""

import dataclasses
import re
from typing import Callable, Optional, Sequence

from absl import logging
import jax
import numpy as np

from hivlp_jax import errors
from hivlp_jax import files
from hivlp_jax import gallery_shards
from hivlp_jax import index_store
from hivlp_jax import retrieval

FORMAT = 1
KIND = 'sharded'
LAYOUT_KEYS = ('format', 'kind', 'num_items', 'num_shards')
SHARD_NAME = re.compile(r'shard_\d{5}-of-\d{5}')


def shard_name(index: int, count: int) -> str:
  return f'shard_{index:05d}-of-{count:05d}'


def shard_bounds(num_items: int, num_shards: int) -> list[tuple[int, int]]:
  """[start, stop) of each shard: `gallery_shards.Shard.bounds`."""
  return [gallery_shards.Shard(i, num_shards, gather=None).bounds(num_items) for i in range(num_shards)]


def layout(num_items: int, num_shards: int) -> dict:
  """The top-level manifest without the shards' fingerprints: what a saved one must match."""
  return {'format': FORMAT, 'kind': KIND, 'num_items': int(num_items), 'num_shards': int(num_shards),
          'shards': [{'name': shard_name(i, num_shards), 'start': start, 'stop': stop}
                     for i, (start, stop) in enumerate(shard_bounds(num_items, num_shards))]}


def stale_reasons(found: Optional[dict], wanted: dict) -> list[str]:
  """Why a sharded index with top-level manifest `found` cannot serve the `layout` `wanted` (empty: it can)."""
  if found is not None and found.get('kind') != KIND:
    return [f'kind: saved {found.get("kind", "a single index")!r}, wanted {wanted["num_shards"]} shards']
  reasons = index_store.stale_reasons(found, {key: wanted[key] for key in LAYOUT_KEYS})
  if found is not None and not reasons:
    ranges = [[s.get('name'), s.get('start'), s.get('stop')] for s in found.get('shards', [])]
    wanted_ranges = [[s['name'], s['start'], s['stop']] for s in wanted['shards']]
    if ranges != wanted_ranges:
      reasons.append(f'shard ranges: saved {ranges}, wanted {wanted_ranges}')
  return reasons


def check_processes(num_shards: int, process_count: int) -> None:
  """InputError unless one process serves the gallery, or each of the processes one of its shards."""
  if num_shards < 1:
    raise errors.InputError(f'num_shards={num_shards} must be at least 1.')
  if process_count > 1 and num_shards != process_count:
    raise errors.InputError(
        f'The gallery has {num_shards} shards but the job runs {process_count} processes: in a multi-process '
        'job each process serves one shard (a single process may serve them all).')


class ShardedIndex:
  """Shards of one gallery searched as one index (`retrieval.Index`): each shard's results get global ids
  (its `start` added), and `search` merges the shards' top-k (`gallery_shards.merge_top_k`, ties to the
  lower global id)."""

  def __init__(self, shards: Sequence[retrieval.Index], starts: Sequence[int]):
    self.shards, self.starts = list(shards), [int(s) for s in starts]
    self.num_items = sum(shard.num_items for shard in self.shards)

  @property
  def shortlist(self) -> int:
    return self.shards[0].shortlist

  @property
  def num_leaves(self) -> int:
    """The fewest leaves of a shard's tree (0: brute force), the largest `leaves_to_search` all of them take."""
    return min(getattr(shard, 'num_leaves', 0) for shard in self.shards)

  def with_knobs(self, shortlist: int, leaves_to_search: Optional[int] = None) -> 'ShardedIndex':
    """Every shard at these knobs (see `tuning`)."""
    return ShardedIndex([s.with_knobs(shortlist, leaves_to_search) for s in self.shards], self.starts)

  @staticmethod
  def _global(ids: np.ndarray, start: int) -> np.ndarray:
    return np.where(ids >= 0, ids + start, -1)

  def candidates(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every shard's candidates side by side: scores float32 [Q, sum C_i], global ids int64 [Q, sum C_i]."""
    scores, ids = [], []
    for shard, start in zip(self.shards, self.starts):
      shard_scores, shard_ids = shard.candidates(queries)
      shard_scores = np.asarray(shard_scores, np.float32)
      if shard_ids is None:  # Exact: column j is item j.
        shard_ids = np.broadcast_to(np.arange(shard_scores.shape[1]), shard_scores.shape)
      scores.append(shard_scores)
      ids.append(self._global(np.asarray(shard_ids, np.int64), start))
    return np.concatenate(scores, axis=1), np.concatenate(ids, axis=1)

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """queries [Q, D] -> the global top-k of the shards' top-k lists."""
    found = [shard.search(queries, k) for shard in self.shards]
    return gallery_shards.merge_top_k([scores for scores, _ in found],
                                      [self._global(ids, start) for (_, ids), start in zip(found, self.starts)], k)


@dataclasses.dataclass
class ShardedStoredIndex:
  """The shards this process serves (all of them on a single process), as `index_store.StoredIndex` does
  one index. In a multi-process job `shards[0].index()` is this process's shard with local ids, as
  `gallery_shards.rank_queries` takes it."""
  directory: str
  manifest: dict  # The top-level one.
  shards: list[index_store.StoredIndex]
  starts: list[int]
  rebuilt: bool  # A shard was built (not loaded).
  stale_reasons: list[str] = dataclasses.field(default_factory=list)  # Each shard's prefixed by its name.

  @property
  def backend(self) -> str:
    """The shards' backend ('rerank' or 'truncate'; 'rerank+truncate' when 'auto' resolved both)."""
    return '+'.join(sorted({shard.backend for shard in self.shards}))

  @property
  def embeddings(self) -> np.ndarray:
    """[rows, D]: the served shards' embeddings in gallery order (the whole gallery on one process)."""
    return np.concatenate([shard.embeddings for shard in self.shards])

  def index(self, threads: int = 0) -> ShardedIndex:
    return ShardedIndex([shard.index(threads) for shard in self.shards], self.starts)


def _process(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
  if process_count is None:
    return jax.process_index(), jax.process_count()
  return int(process_index or 0), int(process_count)


def _shard_record(directory: files.Path, shard: dict) -> dict:
  """A `layout` shard with its fingerprint and manifest sha256, as saved in its directory."""
  manifest = index_store.read_manifest(directory / shard['name']) or {}
  return shard | {'fingerprint': manifest.get('fingerprint'),
                  'manifest_sha256': index_store.file_sha256(directory / shard['name'] / index_store.MANIFEST)}


def _remove_other_layouts(directory: files.Path, names: set[str]) -> None:
  """Drops shard directories of another layout and the files of a single index saved here before."""
  for path in directory.iterdir():  # Not another process's shard being written (its name has a suffix).
    if (SHARD_NAME.fullmatch(path.name) and path.name not in names) or path.name in (
        index_store.EMBEDDINGS, index_store.SCANN_DIR):
      logging.info('Removing %s: not part of the %d-shard index.', path, len(names))
      path.rmtree() if path.is_dir() else path.unlink()  # pylint: disable=expression-not-assigned


def load_or_build(directory: files.PathLike, embeddings: np.ndarray, step: int, coarse_dim: int, shortlist: int,
                  settings: Optional[retrieval.ScannSettings] = None, source: Optional[dict] = None,
                  backend: str = 'auto', num_shards: int = 1, num_items: Optional[int] = None,
                  process_index: Optional[int] = None, process_count: Optional[int] = None,
                  barrier: Optional[Callable[[], None]] = None):
  """`index_store.load_or_build` of every shard of a gallery saved in `num_shards` shards (see the module
  docstring); `num_shards=1` is `index_store.load_or_build` itself (today's single index directory).

  Args:
    embeddings: the gallery [G, D] on a single process; in a multi-process job this process's rows
      `shard_bounds(num_items, num_shards)[process_index]`, with `num_items` = G.
    process_index, process_count: default jax's; barrier: default `multihost_utils.sync_global_devices`.
  Returns:
    A `ShardedStoredIndex` (an `index_store.StoredIndex` for one shard).
  """
  index, count = _process(process_index, process_count)
  check_processes(num_shards, count)
  if num_shards == 1:
    return index_store.load_or_build(directory, embeddings, step, coarse_dim, shortlist, settings, source, backend)
  num_items = embeddings.shape[0] if count == 1 else num_items
  if num_items is None or num_shards > num_items:
    raise errors.InputError(f'num_shards={num_shards} needs a gallery of at least as many items '
                            f'(num_items={num_items}).')
  directory = files.absolute(directory)
  wanted = layout(num_items, num_shards)
  found = index_store.read_manifest(directory) if directory.is_dir() else None
  reasons = stale_reasons(found, wanted) if directory.is_dir() else []
  if reasons:
    logging.info('The sharded index in %s is stale (%s): rebuilding its shards.', directory, '; '.join(reasons))
  if index == 0 and directory.is_dir():
    _remove_other_layouts(directory, {s['name'] for s in wanted['shards']})
  mine = range(num_shards) if count == 1 else [index]
  shards, all_reasons = [], list(reasons)
  for i in mine:
    shard = wanted['shards'][i]
    rows = embeddings[shard['start']:shard['stop']] if count == 1 else embeddings
    if rows.shape[0] != shard['stop'] - shard['start']:
      raise errors.InputError(f'Process {index} holds {rows.shape[0]} rows of the gallery; its shard '
                              f'{shard["name"]} is rows [{shard["start"]}, {shard["stop"]}) of {num_items}.')
    stored = index_store.load_or_build(directory / shard['name'], rows, step, coarse_dim, shortlist, settings,
                                       source, backend)
    all_reasons += [f'{shard["name"]}: {reason}' for reason in stored.stale_reasons]
    shards.append(stored)
  sync = barrier or (lambda: _sync(f'sharded index {directory}'))
  if count > 1:
    sync()  # Every shard is written.
  manifest = found
  if index == 0:
    manifest = wanted | {'shards': [_shard_record(directory, s) for s in wanted['shards']]}
    if found is None or {key: found.get(key) for key in manifest} != manifest:
      files.write_json(directory / index_store.MANIFEST, manifest)  # Last: it lists complete shards.
    else:
      manifest = found  # Unchanged: keeps what was recorded with it (an operating point).
  if count > 1:
    sync()  # The top-level manifest is written.
    manifest = index_store.read_manifest(directory)
  return ShardedStoredIndex(str(directory), manifest, shards, [wanted['shards'][i]['start'] for i in mine],
                            rebuilt=any(s.rebuilt for s in shards), stale_reasons=all_reasons)


def _sync(name: str) -> None:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  multihost_utils.sync_global_devices(name)


def load(directory: files.PathLike, process_index: Optional[int] = None,
         process_count: Optional[int] = None) -> ShardedStoredIndex:
  """Loads a sharded index (no staleness check): every shard on a single process, this process's shard in
  a multi-process job. IOError names each missing or damaged shard, or one that is not the shard the
  top-level manifest lists; InputError a shard count that is not the process count."""
  directory = files.path(directory)
  manifest = index_store.read_manifest(directory)
  if manifest is None or manifest.get('kind') != KIND:
    raise errors.MissingInputError(f'No sharded index manifest ({index_store.MANIFEST}) in {directory}.')
  index, count = _process(process_index, process_count)
  check_processes(manifest['num_shards'], count)
  shards, starts, problems = [], [], []
  for i, record in enumerate(manifest['shards']):
    if count > 1 and i != index:
      continue
    name = record['name']
    try:
      stored = index_store.load(directory / name)
    except (OSError, errors.InputError) as e:
      problems.append(f'{name}: {e}')
      continue
    if (stored.manifest.get('fingerprint') != record['fingerprint'] or stored.manifest['shape'][0] !=
        record['stop'] - record['start'] or index_store.file_sha256(directory / name / index_store.MANIFEST)
        != record['manifest_sha256']):
      problems.append(f'{name}: not the shard the top-level manifest lists (another fingerprint, size or manifest)')
      continue
    shards.append(stored)
    starts.append(record['start'])
  if problems:
    raise IOError(f'Damaged sharded index in {directory}: {"; ".join(problems)}.')
  return ShardedStoredIndex(str(directory), manifest, shards, starts, rebuilt=False)


def cached_embeddings(directory: files.PathLike, step: int, source: dict) -> Optional[np.ndarray]:
  """`index_store.cached_embeddings` of whatever layout `directory` holds: a single index's, or every
  shard's joined in gallery order (None when a shard's are not cached). They serve any shard count."""
  manifest = index_store.read_manifest(directory)
  if manifest is None or manifest.get('kind') != KIND:
    return index_store.cached_embeddings(directory, step, source)
  parts = [index_store.cached_embeddings(files.path(directory) / s['name'], step, source) for s in manifest['shards']]
  if any(p is None or len(p) != s['stop'] - s['start'] for p, s in zip(parts, manifest['shards'])):
    return None
  return np.concatenate(parts)
