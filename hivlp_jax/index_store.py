"""Saved gallery indexes: a two-stage search's ScaNN searcher on disk, with the embeddings it came from.

An index directory holds
  manifest.json   format, checkpoint step, sha1 fingerprint / shape / dtype of the embeddings, coarse
                  dim, shortlist, the backend ('rerank' or 'truncate', see
                  `coarse_to_fine.TwoStageSearch`), the resolved ScaNN settings, `files` (the size and
                  sha256 of every file below) and, when the caller gives one, `source`: what the
                  embeddings were computed from (e.g. fingerprints of the gallery's inputs and of the
                  model's parameters); `operating_point` once the index was tuned to a recall target
                  (`tuning`, `record_operating_point`): the leaves and shortlist it serves with;
  embeddings.npy  the gallery [G, D] (full dim, unnormalised) that the exact re-ranking stages read;
  scann/          `searcher.serialize(dir, relative_path=True)`: over the normalised coarse prefixes
                  ('rerank'), or the truncate-mode searcher over the normalised full vectors ('truncate').
A directory whose manifest does not match what is asked for (another checkpoint, other embeddings,
other settings, the other backend, an older format) is stale, and so is one with a file that is missing,
empty or differs from its sha256: `load_or_build` logs why and rebuilds it from the embeddings it is
given. Writes go to a sibling directory that is renamed into place, so a crash never leaves a
half-written index behind a valid manifest.

  stored = index_store.load_or_build('runs/x/index', gallery, step, coarse_dim=16, shortlist=1000)
  index = stored.index()  # coarse_to_fine.CoarseToFineIndex or ScannPrefixIndex, by stored.backend.

The saved embeddings double as a cache: `cached_embeddings(directory, step, source)` returns them when
they were computed at `step` from `source` and their file is intact, so a caller can skip embedding the
gallery again.

ScaNN reads and writes its own files (`serialize`, `load_searcher`) on a local disk only: its files are staged
through a local temporary directory and copied with `files`, so the index may live in a bucket like the workdir.

A gallery saved in shards (one such directory per shard, one top-level manifest) is `sharded_index`'s.
"""

import dataclasses
import hashlib
import io
import json
import os
import tempfile
from typing import Any, Optional

from absl import logging
import numpy as np

from hivlp_jax import coarse_to_fine
from hivlp_jax import errors
from hivlp_jax import files
from hivlp_jax import retrieval

FORMAT = 2  # 2: the manifest lists every file's sha256 (a format-1 index is rebuilt).
MANIFEST = 'manifest.json'
EMBEDDINGS = 'embeddings.npy'
SCANN_DIR = 'scann'


def fingerprint(array: np.ndarray) -> str:
  """sha1 of an array's dtype, shape and bytes: identifies the gallery an index was built from."""
  array = np.ascontiguousarray(array)
  digest = hashlib.sha1(f'{array.dtype.str}{array.shape}'.encode())
  digest.update(memoryview(array.reshape(-1)).cast('B'))
  return digest.hexdigest()


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def file_sha256(path: files.PathLike) -> str:
  """sha256 of a file's bytes, read in blocks."""
  path = files.path(path)
  digest = hashlib.sha256()
  with path.open('rb') as f:
    for block in iter(lambda: f.read(1 << 24), b''):
      digest.update(block)
  return digest.hexdigest()


def file_records(directory: files.PathLike) -> dict[str, dict]:
  """{path relative to `directory`: {'bytes': size, 'sha256': digest}} of the embeddings and ScaNN's files."""
  directory = files.path(directory)
  # walk, not rglob: epath refuses recursive globs.
  paths = [directory / EMBEDDINGS] + sorted(root / name for root, _, names in (directory / SCANN_DIR).walk()
                                            for name in names)
  return {str(p.relative_to(directory)): {'bytes': p.stat().length, 'sha256': file_sha256(p)} for p in paths}


def damaged_files(directory: files.PathLike, manifest: dict) -> list[str]:
  """'<file>: <what is wrong>' for each file the manifest lists that is missing, empty or not as saved."""
  directory = files.path(directory)
  problems = []
  for name, record in sorted(manifest.get('files', {}).items()):
    path = directory / name
    if not path.is_file():
      problems.append(f'{name}: missing')
    elif (size := path.stat().length) == 0 and record['bytes']:
      problems.append(f'{name}: zero bytes')
    elif size != record['bytes']:
      problems.append(f'{name}: {size} bytes, {record["bytes"]} saved')
    elif file_sha256(path) != record['sha256']:
      problems.append(f'{name}: sha256 differs from the manifest')
  return problems


@dataclasses.dataclass
class StoredIndex:
  searcher: Any  # scann_ops_pybind.ScannSearcher of the manifest's backend.
  embeddings: np.ndarray  # [G, D], as saved.
  manifest: dict
  rebuilt: bool  # False when it was loaded from disk.
  stale_reasons: list[str] = dataclasses.field(default_factory=list)  # Why a saved index was rebuilt.

  @property
  def backend(self) -> str:
    """'rerank' or 'truncate': how `searcher` was built (never 'auto')."""
    return self.manifest['backend']

  def mode(self, threads: int = 0) -> coarse_to_fine.TwoStageSearch:
    """The two-stage search this index serves (`threads`: as `ScannSettings.threads`)."""
    return coarse_to_fine.TwoStageSearch(self.manifest['coarse_dim'], self.manifest['shortlist'],
                                         retrieval.ScannSettings(threads=threads), backend=self.backend)

  def index(self, threads: int = 0):
    """The searchable index over `embeddings` and the saved searcher: a `coarse_to_fine.CoarseToFineIndex`
    ('rerank') or `coarse_to_fine.ScannPrefixIndex` ('truncate')."""
    return self.mode(threads).build(self.embeddings, searcher=self.searcher)


def make_manifest(embeddings: np.ndarray, step: int, coarse_dim: int, shortlist: int,
                  settings: Optional[retrieval.ScannSettings] = None, source: Optional[dict] = None,
                  backend: str = 'auto') -> dict:
  """What identifies an index: it is reused only when all of this matches (`save` adds the files).

  `backend` is resolved for the gallery's size ('auto' is never saved). `source` (JSON-serialisable,
  compared as saved) describes what the embeddings were computed from.
  """
  mode = coarse_to_fine.TwoStageSearch(coarse_dim, shortlist, settings, backend=backend)
  scann_settings = dataclasses.asdict(mode.scann_settings(embeddings.shape[0]))  # As `build_searcher` builds.
  del scann_settings['threads']  # How fast it is searched, not what was built.
  return {
      'format': FORMAT,
      'step': int(step),
      'fingerprint': fingerprint(embeddings),
      'shape': list(embeddings.shape),
      'dtype': np.dtype(embeddings.dtype).str,
      'coarse_dim': int(coarse_dim),
      'shortlist': int(shortlist),
      'backend': mode.resolve_backend(embeddings.shape[0]),
      'scann_settings': scann_settings,
  } | ({} if source is None else {'source': source})


def read_manifest(directory: files.PathLike) -> Optional[dict]:
  """The manifest in `directory`, or None when there is none or it cannot be parsed."""
  try:
    return files.read_json(files.path(directory) / MANIFEST)
  except (OSError, ValueError):
    return None


def stale_reasons(found: Optional[dict], wanted: dict) -> list[str]:
  """Why an index with manifest `found` cannot serve `wanted` (empty: it can)."""
  if found is None:
    return ['no readable manifest']
  return [f'{key}: saved {found.get(key)!r}, wanted {value!r}'
          for key, value in wanted.items() if found.get(key) != value]


def save(directory: files.PathLike, searcher, embeddings: np.ndarray, manifest: dict) -> dict:
  """Writes searcher, embeddings and manifest (with `files` added) to `directory`, replacing what was
  there; returns the manifest written."""
  directory = files.absolute(directory)
  tmp = directory.parent / f'{directory.name}.tmp-{os.getpid()}'
  old = directory.parent / f'{directory.name}.old-{os.getpid()}'
  if tmp.exists():
    tmp.rmtree()
  (tmp / SCANN_DIR).mkdir(parents=True)
  with tempfile.TemporaryDirectory() as local:
    # Relative asset paths, so the files still load from another directory (see _load_searcher).
    searcher.serialize(local, relative_path=True)
    files.copy_tree(local, tmp / SCANN_DIR)
  files.save_npy(tmp / EMBEDDINGS, embeddings)
  manifest = manifest | {'files': file_records(tmp)}
  files.write_json(tmp / MANIFEST, manifest)  # Last: its presence marks a complete index.
  if directory.exists():
    directory.rename(old)
  tmp.rename(directory)
  if old.exists():
    old.rmtree()
  return manifest


def record_operating_point(directory: files.PathLike, manifest: dict, point: dict) -> None:
  """Writes `manifest` (the index's, as loaded or saved) with `point` (a `tuning.OperatingPoint` as JSON,
  with what it was tuned on) added; the index itself is unchanged, so a rebuild (a new manifest) drops it."""
  files.write_json(files.path(directory) / MANIFEST, manifest | {'operating_point': point})


def _load_searcher(directory: files.PathLike):
  import scann  # pylint: disable=g-import-not-at-top  # Imports TensorFlow: only when used.
  with tempfile.TemporaryDirectory() as local:
    files.copy_tree(files.path(directory) / SCANN_DIR, local)
    return scann.scann_ops_pybind.load_searcher(local)


def load(directory: files.PathLike) -> StoredIndex:
  """Loads an index directory (no staleness check); IOError names a damaged file (`damaged_files`)."""
  manifest = read_manifest(directory)
  if manifest is None:
    raise errors.MissingInputError(f'No readable {MANIFEST} in {directory}.')
  damaged = damaged_files(directory, manifest)
  if damaged:
    raise IOError(f'Damaged index in {directory}: {"; ".join(damaged)}.')
  return StoredIndex(_load_searcher(directory), files.load_npy(files.path(directory) / EMBEDDINGS), manifest,
                     rebuilt=False)


def cached_embeddings(directory: files.PathLike, step: int, source: dict) -> Optional[np.ndarray]:
  """The embeddings [G, D] saved in `directory` when they were computed at checkpoint `step` from
  `source` (as given to `load_or_build`) and their file is as saved; else None (a damaged file is
  logged), and the caller embeds afresh."""
  found = read_manifest(directory)
  if (found is None or found.get('format') != FORMAT or found.get('step') != int(step)
      or found.get('source') != json.loads(json.dumps(source))):  # As it reads back from JSON.
    return None
  path = files.path(directory) / EMBEDDINGS
  try:
    data = path.read_bytes()
  except OSError:
    data = None
  if data is None or _sha256(data) != found['files'].get(EMBEDDINGS, {}).get('sha256'):
    logging.warning('The cached embeddings %s are %s: embedding the gallery again.', path,
                    'missing' if data is None else 'damaged (their sha256 differs from the manifest)')
    return None
  return np.load(io.BytesIO(data), allow_pickle=False)


def load_or_build(directory: files.PathLike, embeddings: np.ndarray, step: int, coarse_dim: int, shortlist: int,
                  settings: Optional[retrieval.ScannSettings] = None,
                  source: Optional[dict] = None, backend: str = 'auto') -> StoredIndex:
  """The ScaNN searcher of `TwoStageSearch(coarse_dim, shortlist, settings, backend=backend)` over
  `embeddings` [G, D] at checkpoint `step`: loaded when `directory` holds a matching, undamaged one (same
  resolved backend, and same `source` too when given), else built from `embeddings`, saved and returned.
  A saved index of the other backend is stale. `stored.index()` serves it."""
  embeddings = np.ascontiguousarray(embeddings, np.float32)
  wanted = json.loads(json.dumps(
      make_manifest(embeddings, step, coarse_dim, shortlist, settings, source, backend=backend)))
  reasons = []
  if files.path(directory).is_dir():
    found = read_manifest(directory)
    reasons = stale_reasons(found, wanted)
    if not reasons:
      reasons = damaged_files(directory, found)
      if reasons:
        logging.warning('The index in %s is damaged (%s): rebuilding it.', directory, '; '.join(reasons))
    else:
      logging.info('The index in %s is stale (%s): rebuilding it.', directory, '; '.join(reasons))
    if not reasons:
      try:
        # The caller's embeddings match the saved fingerprint (and the saved file its sha256): serve them.
        stored = StoredIndex(_load_searcher(directory), embeddings, found, rebuilt=False)
        logging.info('Loaded the %s index in %s (step %d, %d items).', stored.backend, directory, step,
                     embeddings.shape[0])
        return stored
      except Exception as e:  # pylint: disable=broad-except  # An unloadable index is rebuilt, not fatal.
        reasons = [f'loading failed: {type(e).__name__}: {e}']
        logging.warning('The index in %s could not be loaded (%s): rebuilding it.', directory, reasons[0])
  else:
    logging.info('No index in %s: building it (%s).', directory, wanted['backend'])
  mode = coarse_to_fine.TwoStageSearch(coarse_dim, shortlist, settings, backend=wanted['backend'])
  searcher = mode.build_searcher(embeddings)
  manifest = save(directory, searcher, embeddings, wanted)
  return StoredIndex(searcher, embeddings, manifest, rebuilt=True, stale_reasons=reasons)
