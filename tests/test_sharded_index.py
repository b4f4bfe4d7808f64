"""A gallery saved in shards (one index per shard, one manifest): merged search, reload, staleness, damage.

The properties, for a gallery split into contiguous shards:
  * each shard searched exactly: the merged top-k is the top-k of one exact index over the gallery (ids,
    ties to the lower global id, and scores);
  * two-stage with ScaNN's brute-force coarse stage (galleries below `brute_force_below`): each shard
    shortlists its own `shortlist` best coarse items, so the union of the shards' shortlists holds the one
    index's shortlist; the merged top-k re-ranks a superset, so its scores are at least the one index's,
    equal to them (and to the exact top-k) wherever the one index's top-k is the exact top-k, and the
    exact top-k outright once the shortlist covers a whole shard.
"""

import logging
import os
import threading

import numpy as np
import pytest

from hivlp_jax import coarse_to_fine
from hivlp_jax import errors
from hivlp_jax import index_store
from hivlp_jax import ranking
from hivlp_jax import retrieval
from hivlp_jax import sharded_index
from hivlp_jax import tuning
from tests.test_retrieval import decaying_embeddings

NUM_ITEMS, DIM, K = 301, 16, 10
KWARGS = dict(coarse_dim=8, shortlist=40)


def _gallery():
  gallery, queries = decaying_embeddings(NUM_ITEMS, DIM, num_queries=40)
  return gallery, queries


def _search(stored, queries, k=K):
  return stored.index(threads=1).search(queries, k)


def test_shards_searched_exactly_merge_to_one_exact_index_ties_to_the_lower_id():
  gallery, queries = _gallery()
  # Copies across shard boundaries (shards [0, 101), [101, 201), [201, 301)): equal scores, lower id first.
  gallery[150] = gallery[250] = gallery[7]
  queries[:5] = gallery[7]
  bounds = sharded_index.shard_bounds(NUM_ITEMS, 3)
  assert bounds == [(0, 101), (101, 201), (201, 301)]
  sharded = sharded_index.ShardedIndex([retrieval.ExactIndex(gallery[a:b]) for a, b in bounds],
                                       [a for a, _ in bounds])
  assert sharded.num_items == NUM_ITEMS
  scores, ids = sharded.search(queries, K)
  exact_scores, exact_ids = retrieval.ExactIndex(gallery).search(queries, K)
  np.testing.assert_array_equal(ids, exact_ids)
  np.testing.assert_allclose(scores, exact_scores, atol=1e-6)
  assert list(ids[0, :3]) == [7, 150, 250]
  # Candidates with global ids: the evaluator's ranking over them is the one index's.
  positives = np.arange(len(queries))[:, None] % NUM_ITEMS
  one = ranking.rank_queries(retrieval.ExactIndex(gallery), queries, positives, K)
  merged = ranking.rank_queries(sharded, queries, positives, K)
  np.testing.assert_array_equal(merged.ranks, one.ranks)
  np.testing.assert_array_equal(merged.ids, one.ids)


def test_a_gallery_saved_in_three_shards_matches_one_index_and_reloads(tmp_path):
  gallery, queries = _gallery()
  directory = str(tmp_path / 'index')
  stored = sharded_index.load_or_build(directory, gallery, step=7, num_shards=3, **KWARGS)
  assert stored.rebuilt and stored.backend == 'rerank' and len(stored.shards) == 3
  assert sorted(os.listdir(directory)) == ['manifest.json'] + [f'shard_0000{i}-of-00003' for i in range(3)]
  manifest = index_store.read_manifest(directory)
  assert manifest['num_shards'] == 3 and manifest['num_items'] == NUM_ITEMS
  assert [(s['start'], s['stop']) for s in manifest['shards']] == sharded_index.shard_bounds(NUM_ITEMS, 3)
  for i, record in enumerate(manifest['shards']):
    shard = index_store.read_manifest(os.path.join(directory, record['name']))
    rows = gallery[record['start']:record['stop']]
    assert record['fingerprint'] == shard['fingerprint'] == index_store.fingerprint(rows)
    assert shard['shape'] == [record['stop'] - record['start'], DIM] and stored.shards[i].manifest == shard

  scores, ids = _search(stored, queries)
  one = index_store.load_or_build(str(tmp_path / 'one'), gallery, step=7, **KWARGS)
  one_scores, one_ids = _search(one, queries)
  exact_scores, exact_ids = retrieval.ExactIndex(gallery).search(queries, K)
  # The shards' shortlists hold the one index's (brute-force coarse stage): scores at least as good.
  sharded_candidates = stored.index(threads=1).candidates(queries)[1]
  one_candidates = one.index(threads=1).candidates(queries)[1]
  for row in range(len(queries)):
    assert set(one_candidates[row]) <= set(sharded_candidates[row])
  assert np.all(scores >= one_scores - 1e-6)
  same = np.all(one_ids == exact_ids, axis=1)
  assert same.sum() >= len(queries) // 2
  assert np.all(ids == exact_ids, axis=1).sum() >= same.sum()  # 39 and 22 of 40 here.
  np.testing.assert_array_equal(ids[same], one_ids[same])
  np.testing.assert_allclose(scores[same], one_scores[same], atol=1e-6)

  # Reloaded from disk (with or without the embeddings): the same results.
  again = sharded_index.load_or_build(directory, gallery, step=7, num_shards=3, **KWARGS)
  assert not again.rebuilt and not again.stale_reasons
  loaded = sharded_index.load(directory)
  np.testing.assert_array_equal(loaded.embeddings, gallery)
  for reloaded in (again, loaded):
    reloaded_scores, reloaded_ids = _search(reloaded, queries)
    np.testing.assert_array_equal(reloaded_ids, ids)
    np.testing.assert_allclose(reloaded_scores, scores, atol=1e-6)

  # A shortlist covering a whole shard: every item is scored, the merged top-k is the exact one.
  whole = sharded_index.load_or_build(str(tmp_path / 'whole'), gallery, step=7, coarse_dim=8, shortlist=101,
                                      num_shards=3)
  whole_scores, whole_ids = _search(whole, queries)
  np.testing.assert_array_equal(whole_ids, exact_ids)
  np.testing.assert_allclose(whole_scores, exact_scores, atol=1e-6)

  # The tuner takes the merged index (every shard at the chosen knobs).
  tuned, point = tuning.tune_index(stored.index(threads=1), queries, exact_ids, 0.9, shortlists=(10, 20, 50))
  assert point.recall_at_10 >= 0.9 and all(s.shortlist == tuned.shortlist for s in tuned.shards)


def _flip_last_byte(path):
  with open(path, 'r+b') as f:
    f.seek(-3, os.SEEK_END)
    byte = f.read(1)
    f.seek(-3, os.SEEK_END)
    f.write(bytes([byte[0] ^ 0x40]))


def test_a_damaged_or_missing_shard_is_named_and_rebuilt(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  gallery, queries = _gallery()
  directory = str(tmp_path / 'index')
  first = sharded_index.load_or_build(directory, gallery, step=1, num_shards=3, **KWARGS)
  _flip_last_byte(os.path.join(directory, 'shard_00001-of-00003', index_store.EMBEDDINGS))
  with pytest.raises(IOError, match=r'shard_00001-of-00003: Damaged index .*embeddings.npy: sha256 differs'):
    sharded_index.load(directory)
  caplog.clear()
  repaired = sharded_index.load_or_build(directory, gallery, step=1, num_shards=3, **KWARGS)
  assert [s.rebuilt for s in repaired.shards] == [False, True, False]
  assert repaired.stale_reasons == ['shard_00001-of-00003: embeddings.npy: sha256 differs from the manifest']
  assert 'shard_00001-of-00003' in caplog.text
  np.testing.assert_allclose(_search(repaired, queries)[0], _search(first, queries)[0], atol=1e-6)
  sharded_index.load(directory)  # Intact again, and the top-level manifest lists the new shard.

  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(os.path.join(directory, 'shard_00002-of-00003'))
  with pytest.raises(IOError, match=r'shard_00002-of-00003: No readable manifest.json'):
    sharded_index.load(directory)
  assert [s.rebuilt for s in sharded_index.load_or_build(directory, gallery, step=1, num_shards=3,
                                                         **KWARGS).shards] == [False, False, True]
  # A shard replaced by another one (valid on its own) is not the one the top-level manifest lists.
  other = sharded_index.load_or_build(str(tmp_path / 'other'), gallery[::-1].copy(), step=1, num_shards=3,
                                      **KWARGS)
  shutil.rmtree(os.path.join(directory, 'shard_00000-of-00003'))
  shutil.copytree(os.path.join(other.directory, 'shard_00000-of-00003'),
                  os.path.join(directory, 'shard_00000-of-00003'))
  with pytest.raises(IOError, match='shard_00000-of-00003: not the shard the top-level manifest lists'):
    sharded_index.load(directory)


def test_another_shard_count_or_other_ranges_are_stale(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  gallery, _ = _gallery()
  directory = str(tmp_path / 'index')
  sharded_index.load_or_build(directory, gallery, step=1, num_shards=3, **KWARGS)
  saved = index_store.read_manifest(directory)
  assert sharded_index.stale_reasons(saved, sharded_index.layout(NUM_ITEMS, 3)) == []
  assert sharded_index.stale_reasons(saved, sharded_index.layout(NUM_ITEMS, 2)) == ['num_shards: saved 3, wanted 2']
  moved = dict(saved, shards=[dict(s) for s in saved['shards']])
  moved['shards'][0]['stop'] = moved['shards'][1]['start'] = 100
  assert sharded_index.stale_reasons(moved, sharded_index.layout(NUM_ITEMS, 3))[0].startswith('shard ranges: saved')

  two = sharded_index.load_or_build(directory, gallery, step=1, num_shards=2, **KWARGS)
  assert two.rebuilt and two.stale_reasons[0] == 'num_shards: saved 3, wanted 2' and 'stale' in caplog.text
  assert sorted(os.listdir(directory)) == ['manifest.json', 'shard_00000-of-00002', 'shard_00001-of-00002']
  # Back to one shard: today's single index directory, in place of the shards.
  one = sharded_index.load_or_build(directory, gallery, step=1, num_shards=1, **KWARGS)
  assert isinstance(one, index_store.StoredIndex) and one.rebuilt
  assert isinstance(one.index(), coarse_to_fine.CoarseToFineIndex)
  os.mkdir(os.path.join(directory, 'shard_00001-of-00002.tmp-99'))  # Another process's shard being written.
  three = sharded_index.load_or_build(directory, gallery, step=1, num_shards=3, **KWARGS)
  assert 'shard_00001-of-00002.tmp-99' in os.listdir(directory)
  assert three.rebuilt and 'shard_00000-of-00003' in os.listdir(directory)
  assert index_store.EMBEDDINGS not in os.listdir(directory)  # The single index's files are gone.
  np.testing.assert_array_equal(sharded_index.cached_embeddings(directory, 1, None), gallery)  # Any layout's.


def test_a_shard_count_that_is_not_the_process_count_is_named(tmp_path):
  gallery, _ = _gallery()
  directory = str(tmp_path / 'index')
  with pytest.raises(errors.InputError, match='The gallery has 3 shards but the job runs 2 processes'):
    sharded_index.load_or_build(directory, gallery[:150], step=1, num_shards=3, num_items=NUM_ITEMS,
                                process_index=0, process_count=2, **KWARGS)
  sharded_index.load_or_build(directory, gallery, step=1, num_shards=3, **KWARGS)
  with pytest.raises(errors.InputError, match='The gallery has 3 shards but the job runs 2 processes'):
    sharded_index.load(directory, process_index=1, process_count=2)
  with pytest.raises(errors.InputError, match='num_shards=0 must be at least 1'):
    sharded_index.load_or_build(directory, gallery, step=1, num_shards=0, **KWARGS)


def test_two_processes_write_their_shards_and_one_host_serves_them(tmp_path):
  """Two processes (threads with a barrier here) each save their share; one process loads both shards and
  answers as an index built by one process."""
  gallery, queries = _gallery()
  directory = str(tmp_path / 'index')
  bounds = sharded_index.shard_bounds(NUM_ITEMS, 2)
  barrier = threading.Barrier(2, timeout=120)
  results, failures = {}, []

  def process(i):
    try:
      start, stop = bounds[i]
      results[i] = sharded_index.load_or_build(directory, gallery[start:stop], step=3, num_shards=2,
                                               num_items=NUM_ITEMS, process_index=i, process_count=2,
                                               barrier=barrier.wait, **KWARGS)
    except Exception as e:  # pylint: disable=broad-except
      failures.append(e)
      barrier.abort()

  threads = [threading.Thread(target=process, args=(i,)) for i in range(2)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert not failures, failures
  assert [r.starts for r in (results[0], results[1])] == [[0], [151]]
  assert results[0].manifest == results[1].manifest == index_store.read_manifest(directory)
  served = sharded_index.load(directory)
  single = sharded_index.load_or_build(str(tmp_path / 'single'), gallery, step=3, num_shards=2, **KWARGS)
  np.testing.assert_array_equal(_search(served, queries)[1], _search(single, queries)[1])
  with pytest.raises(errors.InputError, match=r'Process 1 holds 10 rows .* shard_00001-of-00002 is rows \[151, 301\)'):
    sharded_index.load_or_build(directory, gallery[:10], step=3, num_shards=2, num_items=NUM_ITEMS,
                                process_index=1, process_count=2, barrier=lambda: None, **KWARGS)


_TWO_PROCESS_SAVE = '''
import sys
import jax
port, process_id, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=process_id)
from hivlp_jax import sharded_index
from tests.test_sharded_index import KWARGS, NUM_ITEMS, _gallery
start, stop = sharded_index.shard_bounds(NUM_ITEMS, 2)[jax.process_index()]
stored = sharded_index.load_or_build(directory, _gallery()[0][start:stop], step=3, num_shards=2,
                                     num_items=NUM_ITEMS, **KWARGS)  # jax's process index and count, its barrier.
print('starts', stored.starts, flush=True)
'''


def test_a_real_two_process_job_saves_one_sharded_index(tmp_path):
  """As above, but two processes of one `jax.distributed` job on localhost, with jax's process index and
  count and its barrier (multihost_utils.sync_global_devices): the index one host then serves answers as one
  process's."""
  import socket  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  directory = str(tmp_path / 'index')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  jobs = [subprocess.Popen([sys.executable, '-c', _TWO_PROCESS_SAVE, str(port), str(i), directory], cwd=repo,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
  finally:
    for job in jobs:
      job.kill()
  for job, output in zip(jobs, outputs):
    assert job.returncode == 0, output[-3000:]
  assert 'starts [0]' in outputs[0] and 'starts [151]' in outputs[1]
  gallery, queries = _gallery()
  served = sharded_index.load(directory)
  single = sharded_index.load_or_build(str(tmp_path / 'single'), gallery, step=3, num_shards=2, **KWARGS)
  np.testing.assert_array_equal(_search(served, queries)[1], _search(single, queries)[1])
  assert [s['name'] for s in index_store.read_manifest(directory)['shards']] == [
      'shard_00000-of-00002', 'shard_00001-of-00002']
