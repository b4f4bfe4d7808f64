"""Saved gallery indexes: the stage-1 ScaNN searcher on disk, with the embeddings it was built from.

An index directory holds
  manifest.json   format, checkpoint step, sha1 fingerprint / shape / dtype of the embeddings, coarse
                  dim, shortlist, the resolved ScaNN settings and, when the caller gives one, `source`:
                  what the embeddings were computed from (e.g. fingerprints of the gallery's inputs and
                  of the model's parameters);
  embeddings.npy  the gallery [G, D] (full dim, unnormalised) that the exact re-ranking stages read;
  scann/          `searcher.serialize(dir, relative_path=True)` over the normalised coarse prefixes.
A directory whose manifest does not match what is asked for (another checkpoint, other embeddings,
other settings) is stale: `load_or_build` logs why and rebuilds it. Writes go to a sibling directory
that is renamed into place, so a crash never leaves a half-written index behind a valid manifest.

  stored = index_store.load_or_build('runs/x/index', gallery, step, coarse_dim=16, shortlist=1000)
  index = retrieval.TwoStageSearch(16, 1000).build(stored.embeddings, searcher=stored.searcher)

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


@dataclasses.dataclass
class StoredIndex:
  searcher: Any  # scann_ops_pybind.ScannSearcher over the normalised coarse prefixes.
  embeddings: np.ndarray  # [G, D], as saved.
  manifest: dict
  rebuilt: bool  # False when it was loaded from disk.
  stale_reasons: list[str] = dataclasses.field(default_factory=list)  # Why a saved index was rebuilt.


def make_manifest(embeddings: np.ndarray, step: int, coarse_dim: int, shortlist: int,
                  settings: Optional[retrieval.ScannSettings] = None, source: Optional[dict] = None) -> dict:
  """What identifies an index: it is reused only when all of this matches.

  `source` (JSON-serialisable, compared as saved) describes what the embeddings were computed from.
  """
  num_neighbors = min(shortlist, embeddings.shape[0])  # As `FunnelSearch.build_searcher` builds it.
  settings = (settings or retrieval.ScannSettings()).resolve(embeddings.shape[0], num_neighbors)
  scann_settings = dataclasses.asdict(settings)
  del scann_settings['threads']  # How fast it is searched, not what was built.
  return {
      'format': FORMAT,
      'step': int(step),
      'fingerprint': retrieval.fingerprint(embeddings),
      'shape': list(embeddings.shape),
      'dtype': np.dtype(embeddings.dtype).str,
      'coarse_dim': int(coarse_dim),
      'shortlist': int(shortlist),
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
                  source: Optional[dict] = None) -> StoredIndex:
  """The stage-1 index of `embeddings` [G, D] at checkpoint `step`: loaded when `directory` holds a
  matching one (same `source` too, when given), else built (over the normalised `coarse_dim`-prefixes,
  `shortlist` neighbours), saved and returned."""
  embeddings = np.ascontiguousarray(embeddings, np.float32)
  wanted = json.loads(json.dumps(make_manifest(embeddings, step, coarse_dim, shortlist, settings, source)))
  reasons = []
  if os.path.isdir(directory):
    reasons = stale_reasons(read_manifest(directory), wanted)
    if not reasons:
      try:
        stored = load(directory)
        logging.info('Loaded the index in %s (step %d, %d items).', directory, step, embeddings.shape[0])
        return stored
      except Exception as e:  # pylint: disable=broad-except  # A damaged index is rebuilt, not fatal.
        reasons = [f'loading failed: {type(e).__name__}: {e}']
    logging.info('The index in %s is stale (%s): rebuilding it.', directory, '; '.join(reasons))
  else:
    logging.info('No index in %s: building it.', directory)
  searcher = retrieval.TwoStageSearch(coarse_dim, shortlist, settings).build_searcher(embeddings)
  save(directory, searcher, embeddings, wanted)
  return StoredIndex(searcher, embeddings, wanted, rebuilt=True, stale_reasons=reasons)
