"""Saved gallery indexes: reuse, staleness, and damaged files (rebuilt, never served)."""

import json
import logging
import os

import numpy as np
import pytest

from hivlp_jax import coarse_to_fine
from hivlp_jax import index_store
from hivlp_jax import retrieval
from tests.test_retrieval import EXHAUSTIVE_TREE
from tests.test_retrieval import decaying_embeddings


def test_load_or_build_reuses_and_detects_stale_index(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  gallery, queries = decaying_embeddings(1500, 32, num_queries=10)
  directory = str(tmp_path / 'index')
  settings = retrieval.ScannSettings(brute_force_below=0)
  kwargs = dict(coarse_dim=8, shortlist=100, settings=settings, backend='rerank')

  first = index_store.load_or_build(directory, gallery, step=100, **kwargs)
  assert first.rebuilt
  with open(os.path.join(directory, index_store.MANIFEST)) as f:
    manifest = json.load(f)
  assert manifest['step'] == 100 and manifest['coarse_dim'] == 8 and manifest['shape'] == [1500, 32]
  assert manifest['backend'] == 'rerank' and first.backend == 'rerank'
  assert manifest['fingerprint'] == index_store.fingerprint(gallery)

  again = index_store.load_or_build(directory, gallery, step=100, **kwargs)
  assert not again.rebuilt
  np.testing.assert_array_equal(again.embeddings, gallery)
  # Serial search (threads=1) on both, as in the round-trip test.
  fresh, reloaded = [
      coarse_to_fine.CoarseToFineIndex(s.embeddings, ((8, 100),), 32, s.searcher, threads=1).search(queries, 10)
      for s in (first, again)]
  np.testing.assert_allclose(reloaded[0], fresh[0], atol=1e-6)

  caplog.clear()
  newer = index_store.load_or_build(directory, gallery, step=200, **kwargs)
  assert newer.rebuilt and 'stale' in caplog.text and 'step' in caplog.text
  assert index_store.read_manifest(directory)['step'] == 200

  caplog.clear()
  changed = gallery.copy()
  changed[0, 0] += 1.0
  rebuilt = index_store.load_or_build(directory, changed, step=200, **kwargs)
  assert rebuilt.rebuilt and 'fingerprint' in caplog.text
  np.testing.assert_array_equal(index_store.load(directory).embeddings, changed)
  assert not [p for p in os.listdir(tmp_path) if p != 'index']  # No temporary directories left.


def _serial_search(stored, queries, k=10):
  """Serial search (threads=1), as in the round-trip test."""
  return stored.index(threads=1).search(queries, k)


def test_truncate_index_round_trip_and_backend_change(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  gallery, queries = decaying_embeddings(1000, 32, num_queries=10)
  directory = str(tmp_path / 'index')
  settings = retrieval.ScannSettings(brute_force_below=500)  # 'auto' is 'truncate' at 1,000 items.
  kwargs = dict(coarse_dim=8, shortlist=100, settings=settings)

  first = index_store.load_or_build(directory, gallery, step=1, **kwargs)
  assert first.rebuilt and first.backend == 'truncate'
  assert index_store.read_manifest(directory)['backend'] == 'truncate'
  assert isinstance(first.index(), coarse_to_fine.ScannPrefixIndex)
  again = index_store.load_or_build(directory, gallery, step=1, **kwargs, backend='truncate')
  assert not again.rebuilt and again.backend == 'truncate'
  # Scores, not indices: equal scores may come back in either order.
  fresh, reloaded = _serial_search(first, queries), _serial_search(again, queries)
  np.testing.assert_allclose(reloaded[0], fresh[0], atol=1e-6)
  exact_scores, _ = retrieval.ExactIndex(gallery).search(queries, 10)
  # The noisy copy's source comes first for most queries; hashing the 8-d prefix can miss one now and then
  # (about 1 query in 130 in repeated runs: ScaNN's training is not seeded).
  assert np.mean(np.isclose(reloaded[0][:, 0], exact_scores[:, 0], atol=1e-5)) >= 0.8

  # The other backend is stale: rebuilt (and back).
  caplog.clear()
  rerank = index_store.load_or_build(directory, gallery, step=1, **kwargs, backend='rerank')
  assert rerank.rebuilt and rerank.backend == 'rerank'
  assert any(r.startswith("backend: saved 'truncate'") for r in rerank.stale_reasons), rerank.stale_reasons
  assert 'stale' in caplog.text and 'backend' in caplog.text
  assert isinstance(rerank.index(), coarse_to_fine.CoarseToFineIndex)
  assert index_store.read_manifest(directory)['backend'] == 'rerank'
  back = index_store.load_or_build(directory, gallery, step=1, **kwargs)
  assert back.rebuilt and back.backend == 'truncate'
  assert any(r.startswith("backend: saved 'rerank'") for r in back.stale_reasons), back.stale_reasons


def test_cached_embeddings_need_the_same_step_and_source(tmp_path):
  rng = np.random.default_rng(0)
  embeddings = rng.standard_normal((50, 16)).astype(np.float32)
  directory = str(tmp_path / 'index')
  source = {'inputs': 'abc', 'params': 'def'}
  assert index_store.cached_embeddings(directory, 3, source) is None
  assert index_store.load_or_build(directory, embeddings, 3, coarse_dim=8, shortlist=10, source=source).rebuilt
  np.testing.assert_array_equal(index_store.cached_embeddings(directory, 3, source), embeddings)
  assert index_store.cached_embeddings(directory, 4, source) is None
  assert index_store.cached_embeddings(directory, 3, source | {'params': 'xyz'}) is None
  stored = index_store.load_or_build(directory, embeddings, 3, coarse_dim=8, shortlist=10,
                                     source=source | {'params': 'xyz'})
  assert stored.rebuilt and stored.stale_reasons and stored.stale_reasons[0].startswith('source:')




# Damaged files. Brute force ('rerank' below 20,000 items) and an exhaustive tree re-scoring the whole
# gallery ('truncate') search exactly, so a rebuilt index must give exactly what a fresh build gives.
DAMAGE_CASES = {'rerank': dict(coarse_dim=8, shortlist=100, backend='rerank'),
                'truncate': dict(coarse_dim=8, shortlist=300, backend='truncate', settings=EXHAUSTIVE_TREE)}


def _saved_files(directory):
  return sorted(index_store.read_manifest(directory)['files'])


def _fresh_results(gallery, queries, kwargs):
  index = coarse_to_fine.TwoStageSearch(kwargs['coarse_dim'], kwargs['shortlist'], kwargs.get('settings'),
                                        backend=kwargs['backend']).build(gallery)
  return index.search(queries, 10)


def _assert_rebuilt_like_fresh(stored, gallery, queries, kwargs, bad_file, caplog):
  assert stored.rebuilt, 'a damaged index was reported as reused'
  assert any(reason.startswith(bad_file) for reason in stored.stale_reasons), stored.stale_reasons
  damage_lines = [r.getMessage() for r in caplog.records if 'damaged' in r.getMessage()]
  assert len(damage_lines) == 1 and bad_file in damage_lines[0], damage_lines
  scores, ids = stored.index(threads=1).search(queries, 10)
  fresh_scores, fresh_ids = _fresh_results(gallery, queries, kwargs)
  np.testing.assert_array_equal(ids, fresh_ids)
  np.testing.assert_allclose(scores, fresh_scores, atol=1e-6)


def test_manifest_records_every_file_with_its_size_and_sha256(tmp_path):
  gallery, _ = decaying_embeddings(300, 16)
  directory = tmp_path / 'index'
  index_store.load_or_build(str(directory), gallery, step=1, coarse_dim=8, shortlist=20)
  records = index_store.read_manifest(directory)['files']
  on_disk = {str(p.relative_to(directory)) for p in directory.rglob('*') if p.is_file()} - {index_store.MANIFEST}
  assert set(records) == on_disk and index_store.EMBEDDINGS in records
  assert any(name.startswith(index_store.SCANN_DIR + '/') for name in records)
  for name, record in records.items():
    data = (directory / name).read_bytes()
    assert record == {'bytes': len(data), 'sha256': index_store._sha256(data)}  # pylint: disable=protected-access
  assert index_store.damaged_files(directory, index_store.read_manifest(directory)) == []


@pytest.mark.parametrize('backend', list(DAMAGE_CASES))
def test_a_corrupt_byte_in_the_cached_embeddings_rebuilds_from_fresh_ones(backend, tmp_path, caplog):
  """The gallery is embedded again (the cache is refused) and the index rebuilt from those embeddings,
  not served with the corrupt file."""
  caplog.set_level(logging.INFO)
  kwargs = DAMAGE_CASES[backend]
  gallery, queries = decaying_embeddings(300, 32, num_queries=10)
  directory = str(tmp_path / 'index')
  source = {'inputs': 'abc'}
  index_store.load_or_build(directory, gallery, 1, source=source, **kwargs)
  path = os.path.join(directory, index_store.EMBEDDINGS)
  data = bytearray(open(path, 'rb').read())
  data[-3] ^= 0x40  # A byte of the last float: the file still parses, one value is wrong.
  open(path, 'wb').write(bytes(data))
  assert not np.array_equal(np.load(path), gallery)

  assert index_store.cached_embeddings(directory, 1, source) is None
  assert 'embeddings.npy' in caplog.text and 'damaged' in caplog.text
  caplog.clear()
  stored = index_store.load_or_build(directory, gallery, 1, source=source, **kwargs)
  _assert_rebuilt_like_fresh(stored, gallery, queries, kwargs, index_store.EMBEDDINGS, caplog)
  np.testing.assert_array_equal(np.load(path), gallery)  # Repaired on disk: the next query reuses it.
  np.testing.assert_array_equal(index_store.cached_embeddings(directory, 1, source), gallery)
  assert not index_store.load_or_build(directory, gallery, 1, source=source, **kwargs).rebuilt


@pytest.mark.parametrize('backend', list(DAMAGE_CASES))
def test_an_empty_or_missing_scann_file_rebuilds_the_index(backend, tmp_path, caplog):
  caplog.set_level(logging.INFO)
  kwargs = DAMAGE_CASES[backend]
  gallery, queries = decaying_embeddings(300, 32, num_queries=10)
  directory = str(tmp_path / 'index')
  index_store.load_or_build(directory, gallery, 1, **kwargs)
  scann_files = [name for name in _saved_files(directory) if name.startswith(index_store.SCANN_DIR)]
  assert len(scann_files) >= 2
  for name in scann_files:  # Each file of the searcher, emptied in turn.
    open(os.path.join(directory, name), 'wb').close()
    caplog.clear()
    stored = index_store.load_or_build(directory, gallery, 1, **kwargs)
    assert any('zero bytes' in reason for reason in stored.stale_reasons)
    _assert_rebuilt_like_fresh(stored, gallery, queries, kwargs, name, caplog)
  os.remove(os.path.join(directory, scann_files[0]))
  caplog.clear()
  stored = index_store.load_or_build(directory, gallery, 1, **kwargs)
  assert stored.stale_reasons == [f'{scann_files[0]}: missing']
  _assert_rebuilt_like_fresh(stored, gallery, queries, kwargs, scann_files[0], caplog)
  with pytest.raises(IOError, match='zero bytes'):  # `load` refuses what `load_or_build` would rebuild.
    open(os.path.join(directory, scann_files[-1]), 'wb').close()
    index_store.load(directory)


def test_a_corrupt_byte_in_a_scann_file_rebuilds_the_index(tmp_path, caplog):
  """A flipped byte in ScaNN's float32 database still loads and searches: only the sha256 tells."""
  caplog.set_level(logging.INFO)
  kwargs = DAMAGE_CASES['rerank']
  gallery, queries = decaying_embeddings(300, 32, num_queries=10)
  directory = str(tmp_path / 'index')
  index_store.load_or_build(directory, gallery, 1, **kwargs)
  name = max((n for n in _saved_files(directory) if n.startswith(index_store.SCANN_DIR)),
             key=lambda n: os.path.getsize(os.path.join(directory, n)))  # The database: the largest file.
  path = os.path.join(directory, name)
  data = bytearray(open(path, 'rb').read())
  data[-3] ^= 0x40
  open(path, 'wb').write(bytes(data))
  caplog.clear()
  stored = index_store.load_or_build(directory, gallery, 1, **kwargs)
  assert stored.stale_reasons == [f'{name}: sha256 differs from the manifest']
  _assert_rebuilt_like_fresh(stored, gallery, queries, kwargs, name, caplog)


def test_an_index_of_the_previous_format_is_rebuilt(tmp_path):
  """Format 1 recorded no file checksums (nor, before it, the backend): such an index is never served."""
  gallery, _ = decaying_embeddings(300, 16)
  directory = str(tmp_path / 'index')
  index_store.load_or_build(directory, gallery, step=1, coarse_dim=8, shortlist=20)
  manifest = index_store.read_manifest(directory)
  manifest['format'] = 1
  del manifest['files'], manifest['backend']
  with open(os.path.join(directory, index_store.MANIFEST), 'w') as f:
    json.dump(manifest, f)
  assert index_store.cached_embeddings(directory, 1, None) is None
  stored = index_store.load_or_build(directory, gallery, step=1, coarse_dim=8, shortlist=20)
  assert stored.rebuilt and stored.stale_reasons[0] == 'format: saved 1, wanted 2'
  assert index_store.read_manifest(directory)['files']
