"""Saved gallery indexes: a two-stage search's ScaNN searcher on disk, with the embeddings it came from.

An index directory holds
  manifest.json   format, checkpoint step, sha1 fingerprint / shape / dtype of the embeddings, coarse
                  dim, shortlist, the backend ('rerank' or 'truncate', see `retrieval.TwoStageSearch`;
                  a manifest without one predates truncate and is 'rerank'), the resolved ScaNN
                  settings and, when the caller gives one, `source`: what the embeddings were computed
                  from (e.g. fingerprints of the gallery's inputs and of the model's parameters);
  embeddings.npy  the gallery [G, D] (full dim, unnormalised) that the exact re-ranking stages read;
  scann/          `searcher.serialize(dir, relative_path=True)`: over the normalised coarse prefixes
                  ('rerank'), or the truncate-mode searcher over the normalised full vectors ('truncate').
A directory whose manifest does not match what is asked for (another checkpoint, other embeddings,
other settings, the other backend) is stale: `load_or_build` logs why and rebuilds it. Writes go to a
sibling directory that is renamed into place, so a crash never leaves a half-written index behind a
valid manifest.

  stored = index_store.load_or_build('runs/x/index', gallery, step, coarse_dim=16, shortlist=1000)
  index = stored.index()  # retrieval.CoarseToFineIndex or retrieval.ScannPrefixIndex, by stored.backend.

The saved embeddings double as a cache: `cached_embeddings(directory, step, source)` returns them when
they were computed at `step` from `source`, so a caller can skip embedding the gallery again.
"""

import dataclasses
import json
import os
import shutil
from typing import Any, Optional

from absl import logging
import numpy as np

from hivlp_jax import retrieval

FORMAT = 1
MANIFEST = 'manifest.json'
EMBEDDINGS = 'embeddings.npy'
SCANN_DIR = 'scann'


LEGACY_BACKEND = 'rerank'  # Of a manifest written before the backend was recorded.


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
    return self.manifest.get('backend', LEGACY_BACKEND)

  def mode(self, threads: int = 0) -> retrieval.TwoStageSearch:
    """The two-stage search this index serves (`threads`: as `ScannSettings.threads`)."""
    return retrieval.TwoStageSearch(self.manifest['coarse_dim'], self.manifest['shortlist'],
                                    retrieval.ScannSettings(threads=threads), backend=self.backend)

  def index(self, threads: int = 0):
    """The searchable index over `embeddings` and the saved searcher: a `retrieval.CoarseToFineIndex`
    ('rerank') or `retrieval.ScannPrefixIndex` ('truncate')."""
    return self.mode(threads).build(self.embeddings, searcher=self.searcher)


def make_manifest(embeddings: np.ndarray, step: int, coarse_dim: int, shortlist: int,
                  settings: Optional[retrieval.ScannSettings] = None, source: Optional[dict] = None,
                  backend: str = 'auto') -> dict:
  """What identifies an index: it is reused only when all of this matches.

  `backend` is resolved for the gallery's size ('auto' is never saved). `source` (JSON-serialisable,
  compared as saved) describes what the embeddings were computed from.
  """
  mode = retrieval.TwoStageSearch(coarse_dim, shortlist, settings, backend=backend)
  scann_settings = dataclasses.asdict(mode.scann_settings(embeddings.shape[0]))  # As `build_searcher` builds.
  del scann_settings['threads']  # How fast it is searched, not what was built.
  return {
      'format': FORMAT,
      'step': int(step),
      'fingerprint': retrieval.fingerprint(embeddings),
      'shape': list(embeddings.shape),
      'dtype': np.dtype(embeddings.dtype).str,
      'coarse_dim': int(coarse_dim),
      'shortlist': int(shortlist),
      'backend': mode.resolve_backend(embeddings.shape[0]),
      'scann_settings': scann_settings,
  } | ({} if source is None else {'source': source})


def read_manifest(directory: str) -> Optional[dict]:
  """The manifest in `directory`, or None when there is none or it cannot be parsed."""
  try:
    with open(os.path.join(directory, MANIFEST)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def stale_reasons(found: Optional[dict], wanted: dict) -> list[str]:
  """Why an index with manifest `found` cannot serve `wanted` (empty: it can)."""
  if found is None:
    return ['no readable manifest']
  found = {'backend': LEGACY_BACKEND} | found
  return [f'{key}: saved {found.get(key)!r}, wanted {value!r}'
          for key, value in wanted.items() if found.get(key) != value]


def save(directory: str, searcher, embeddings: np.ndarray, manifest: dict) -> None:
  """Writes searcher, embeddings and manifest to `directory`, replacing what was there."""
  directory = os.path.abspath(directory)
  tmp, old = f'{directory}.tmp-{os.getpid()}', f'{directory}.old-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(os.path.join(tmp, SCANN_DIR))
  # Relative asset paths, so the directory still loads after the rename below (or a move).
  searcher.serialize(os.path.join(tmp, SCANN_DIR), relative_path=True)
  np.save(os.path.join(tmp, EMBEDDINGS), embeddings)
  with open(os.path.join(tmp, MANIFEST), 'w') as f:  # Last: its presence marks a complete index.
    json.dump(manifest, f, indent=2, sort_keys=True)
  if os.path.exists(directory):
    os.replace(directory, old)
  os.replace(tmp, directory)
  shutil.rmtree(old, ignore_errors=True)


def load(directory: str) -> StoredIndex:
  """Loads an index directory as it is (no staleness check)."""
  import scann  # pylint: disable=g-import-not-at-top  # Imports TensorFlow: only when used.
  manifest = read_manifest(directory)
  if manifest is None:
    raise FileNotFoundError(f'No readable {MANIFEST} in {directory}.')
  searcher = scann.scann_ops_pybind.load_searcher(os.path.join(directory, SCANN_DIR))
  embeddings = np.load(os.path.join(directory, EMBEDDINGS))
  return StoredIndex(searcher, embeddings, manifest, rebuilt=False)


def cached_embeddings(directory: str, step: int, source: dict) -> Optional[np.ndarray]:
  """The embeddings [G, D] saved in `directory` when they were computed at checkpoint `step` from
  `source` (as given to `load_or_build`) and are intact; else None, and the caller embeds afresh."""
  found = read_manifest(directory)
  if (found is None or found.get('format') != FORMAT or found.get('step') != int(step)
      or found.get('source') != json.loads(json.dumps(source))):  # As it reads back from JSON.
    return None
  try:
    embeddings = np.load(os.path.join(directory, EMBEDDINGS))
  except (OSError, ValueError):
    return None
  if (list(embeddings.shape) != found.get('shape')
      or retrieval.fingerprint(embeddings) != found.get('fingerprint')):
    return None
  return embeddings


def load_or_build(directory: str, embeddings: np.ndarray, step: int, coarse_dim: int, shortlist: int,
                  settings: Optional[retrieval.ScannSettings] = None,
                  source: Optional[dict] = None, backend: str = 'auto') -> StoredIndex:
  """The ScaNN searcher of `TwoStageSearch(coarse_dim, shortlist, settings, backend=backend)` over
  `embeddings` [G, D] at checkpoint `step`: loaded when `directory` holds a matching one (same resolved
  backend, and same `source` too when given), else built, saved and returned. A saved index of the
  other backend is stale. `stored.index()` serves it."""
  embeddings = np.ascontiguousarray(embeddings, np.float32)
  wanted = json.loads(json.dumps(
      make_manifest(embeddings, step, coarse_dim, shortlist, settings, source, backend=backend)))
  reasons = []
  if os.path.isdir(directory):
    reasons = stale_reasons(read_manifest(directory), wanted)
    if not reasons:
      try:
        stored = load(directory)
        logging.info('Loaded the %s index in %s (step %d, %d items).', stored.backend, directory, step,
                     embeddings.shape[0])
        return stored
      except Exception as e:  # pylint: disable=broad-except  # A damaged index is rebuilt, not fatal.
        reasons = [f'loading failed: {type(e).__name__}: {e}']
    logging.info('The index in %s is stale (%s): rebuilding it.', directory, '; '.join(reasons))
  else:
    logging.info('No index in %s: building it (%s).', directory, wanted['backend'])
  mode = retrieval.TwoStageSearch(coarse_dim, shortlist, settings, backend=wanted['backend'])
  searcher = mode.build_searcher(embeddings)
  save(directory, searcher, embeddings, wanted)
  return StoredIndex(searcher, embeddings, wanted, rebuilt=True, stale_reasons=reasons)
