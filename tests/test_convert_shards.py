"""Web tars -> ArrayRecord files (data/convert_shards.py) and their random-access reader (data/records.py)."""

import concurrent.futures
import io
import json
import os
import pathlib
import pickle
import subprocess
import sys
import tarfile

import msgpack
import numpy as np
from PIL import Image
import pytest

from hivlp_jax import errors
from hivlp_jax.data import convert_shards
from hivlp_jax.data import records
from hivlp_jax.data import sources

REPO = pathlib.Path(__file__).resolve().parent.parent
# What the tars below hold, bad samples included: the counts conversion.json must report.
BAD = {'missing_parts': 1, 'empty_captions': 1, 'malformed_json': 1, 'corrupt_shards': 1}


def _image(seed: int, fmt: str = 'JPEG') -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format=fmt)
  return buffer.getvalue()


def _tar_bytes(members) -> tuple[bytes, list[int]]:
  """A tar of (name, bytes) members, and the offset of each member's data."""
  buffer, offsets = io.BytesIO(), []
  with tarfile.open(fileobj=buffer, mode='w') as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
      offsets.append(buffer.tell() - len(data) - (-len(data) % 512))  # The data is padded to 512-byte blocks.
  return buffer.getvalue(), offsets


def _write_tars(root: pathlib.Path) -> list[tuple[str, bytes, tuple[str, ...]]]:
  """Three tars with every kind of bad sample (BAD); returns the good samples in order: (key, image, captions)."""
  good, seed = [], 0

  def sample(key, caption=None, meta=None, fmt='JPEG', ok=True):
    nonlocal seed
    seed += 1
    image = _image(seed, fmt)
    members = [(f'{key}.{"png" if fmt == "PNG" else "jpg"}', image)]
    if caption is not None:
      members.append((f'{key}.txt', caption.encode()))
    if meta is not None:
      members.append((f'{key}.json', meta))
    if ok:
      good.append((key, image, (caption.strip() if caption is not None else json.loads(meta)['caption'],)))
    return members

  first = (sample('a000', 'a red cup') + sample('a001', meta=json.dumps({'caption': 'a dog', 'url': 'x'}).encode())
           + sample('a002', ok=False)  # No caption at all: missing_parts.
           + sample('a003', '  a blue car \n') + sample('a004', '', ok=False)  # Empty: empty_captions.
           + sample('a005', 'a png image', fmt='PNG')
           + sample('a006', meta=b'{"caption": "cut', ok=False))  # Malformed JSON.
  second = sample('b000', 'a tree') + sample('b001', 'a boat', meta=b'{"caption": "ignored: txt wins"}')
  third = sample('c000', 'a house') + sample('c001', 'a bird')
  cut = sample('c002', 'lost to the truncation', ok=False)
  (root / '00000.tar').write_bytes(_tar_bytes(first)[0])
  (root / '00001.tar').write_bytes(_tar_bytes(second)[0])
  data, offsets = _tar_bytes(third + cut)
  (root / '00002.tar').write_bytes(data[:offsets[-2] + 20])  # Cut inside c002's image: none of c002 is read.
  return good


def _examples(reader):
  return [(e.key, e.image, e.captions) for e in (reader[i] for i in range(len(reader)))]


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """(the good samples, the pattern, the output folder, conversion.json's dict) of a conversion of 3 tars."""
  root = tmp_path_factory.mktemp('tars')
  good = _write_tars(root)
  pattern = str(root / '{00000..00002}.tar')
  out = tmp_path_factory.mktemp('out')
  return good, pattern, out, convert_shards.convert(pattern, str(out), examples_per_file=3)


def test_the_records_are_the_good_samples_in_order_and_the_bad_ones_are_counted(converted):
  good, pattern, out, conversion = converted
  assert len(good) == 8
  names = [f'web-{i:05d}-of-00003.array_record' for i in range(3)]
  assert sorted(os.listdir(out)) == sorted(names + ['conversion.json'])  # No temporary file stays.
  assert conversion == json.loads((out / 'conversion.json').read_text())
  assert conversion['files'] == [{'path': n, 'records': r} for n, r in zip(names, [3, 3, 2])]
  assert conversion['stats'] == {'samples': 8, 'corrupt_images': 0, 'corrupt_videos': 0, **BAD}
  assert conversion['source'] == pattern
  assert [(pathlib.Path(t['path']).name, t['bytes']) for t in conversion['tars']] == [
      (f'0000{i}.tar', os.path.getsize(pathlib.Path(pattern).parent / f'0000{i}.tar')) for i in range(3)]
  reader = records.array_record_examples(str(out / '*.array_record'))
  assert len(reader) == len(good)
  assert _examples(reader) == good
  assert {reader[i].kind for i in range(len(reader))} == {'image'}
  assert reader.paths == [str(out / n) for n in names]


def test_random_access_is_the_same_at_any_index_in_any_thread_and_after_pickling(converted):
  good, _, out, _ = converted
  reader = records.array_record_examples(str(out / 'web-*.array_record'))
  order = np.random.default_rng(0).permutation(len(good)).tolist() * 3
  assert [(reader[i].key, reader[i].image) for i in order] == [good[i][:2] for i in order]
  assert reader[-1].key == good[-1][0] and reader[np.int64(4)].key == good[4][0]
  assert reader[4].origin == str(out / 'web-00001-of-00003.array_record') + ' record 1'
  assert [e.key for e in reader.__getitems__(order[:5])] == [good[i][0] for i in order[:5]]
  with pytest.raises(IndexError):
    reader[len(good)]  # pylint: disable=pointless-statement
  with concurrent.futures.ThreadPoolExecutor(8) as executor:
    threaded = list(executor.map(lambda i: reader[i], order))
  assert [(e.key, e.image, e.captions) for e in threaded] == [good[i] for i in order]
  copy = pickle.loads(pickle.dumps(reader))
  assert len(copy) == len(good) and _examples(copy) == good and copy.paths == reader.paths


def test_a_record_round_trips_and_a_bad_record_or_file_is_named(tmp_path):
  example = sources.RawExample('k1', b'\xff\xd8jpeg', ('one', 'two'))
  assert records.decode(records.encode(example), 'f record 0') == sources.RawExample(
      'k1', b'\xff\xd8jpeg', ('one', 'two'), origin='f record 0')
  with pytest.raises(ValueError, match='usable'):
    records.encode(sources.RawExample('k2', b'x', (), 'empty_captions'))
  for bad in (b'\xc1', msgpack.packb([1, 2]), msgpack.packb({'key': 'k', 'image': 'not bytes', 'captions': [],
                                                             'kind': 'image'})):
    with pytest.raises(errors.InputError, match=r'^f\.array_record record 7 .*convert_shards'):
      records.decode(bad, 'f.array_record record 7')
  garbage = tmp_path / 'web-00000-of-00001.array_record'
  garbage.write_bytes(b'not an array record')
  with pytest.raises(errors.InputError, match=f'{garbage}.*not a readable ArrayRecord file.*convert_shards'):
    records.array_record_examples(str(tmp_path / '*.array_record'))


def test_a_pattern_that_matches_nothing_names_itself_and_the_command(tmp_path):
  for pattern in (str(tmp_path / 'web_ar' / '*.array_record'), ''):
    with pytest.raises(errors.MissingInputError) as raised:
      records.array_record_examples(pattern)
    assert repr(pattern) in str(raised.value) and 'python -m hivlp_jax.data.convert_shards' in str(raised.value)
  with pytest.raises(errors.MissingInputError, match='No tars match --shards='):
    convert_shards.convert(str(tmp_path / '*.tar'), str(tmp_path / 'out'))


def test_a_rerun_replaces_the_files_and_another_source_needs_overwrite(tmp_path):
  good = _write_tars(tmp_path)
  out = tmp_path / 'out'
  convert_shards.convert(str(tmp_path / '*.tar'), str(out), examples_per_file=2)
  (out / 'web-00007.array_record.tmp').write_bytes(b'left by a killed run')
  convert_shards.convert(str(tmp_path / '*.tar'), str(out), examples_per_file=5)  # The same source: replaced.
  assert sorted(os.listdir(out)) == ['conversion.json', 'web-00000-of-00002.array_record',
                                     'web-00001-of-00002.array_record']
  assert _examples(records.array_record_examples(str(out / '*.array_record'))) == good  # No stale file read twice.
  with pytest.raises(errors.InputError, match=r'holds a conversion of .*\*\.tar.*--overwrite'):
    convert_shards.convert(str(tmp_path / '0000[01].tar'), str(out))
  conversion = convert_shards.convert(str(tmp_path / '0000[01].tar'), str(out), overwrite=True)
  assert conversion['stats']['corrupt_shards'] == 0 and conversion['stats']['samples'] == 6
  assert sorted(os.listdir(out)) == ['conversion.json', 'web-00000-of-00001.array_record']


def test_a_failed_conversion_leaves_no_file_that_looks_complete(tmp_path, monkeypatch):
  good = _write_tars(tmp_path)
  out = tmp_path / 'out'
  convert_shards.convert(str(tmp_path / '*.tar'), str(out), examples_per_file=2)
  before = {name: (out / name).read_bytes() for name in os.listdir(out)}
  encode, calls = records.encode, []

  def interrupted(example):
    calls.append(example.key)
    if len(calls) == 6:  # Ctrl-C with two files closed and one open.
      raise KeyboardInterrupt
    return encode(example)

  monkeypatch.setattr(records, 'encode', interrupted)
  with pytest.raises(KeyboardInterrupt):
    convert_shards.convert(str(tmp_path / '*.tar'), str(out), examples_per_file=2)
  # The earlier conversion is untouched and no temporary file stays.
  assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
  assert _examples(records.array_record_examples(str(out / '*.array_record'))) == good

  data, _ = _tar_bytes([('k.txt', b'a caption without its image')])
  (tmp_path / 'bad.tar').write_bytes(data)
  with pytest.raises(errors.InputError, match=r"No usable example .*'missing_parts': 1"):
    convert_shards.convert(str(tmp_path / 'bad.tar'), str(tmp_path / 'out2'), examples_per_file=1)
  assert not os.listdir(tmp_path / 'out2')


def test_the_command_converts_end_to_end(tmp_path):
  good = _write_tars(tmp_path)
  out = tmp_path / 'web_ar'
  env = dict(os.environ, PYTHONPATH=str(REPO))
  command = [sys.executable, '-m', 'hivlp_jax.data.convert_shards', f'--shards={tmp_path}/{{00000..00002}}.tar',
             f'--out_dir={out}', '--examples_per_file=5']
  done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'Wrote 8 examples in 2 files' in done.stdout
  assert 'Converted 3/3 tars: 8 examples' in done.stderr
  assert f'skipped an example (missing_parts): {tmp_path}/00000.tar: a002' in done.stderr
  assert 'skipped the rest of a truncated or corrupt shard' in done.stderr
  assert _examples(records.array_record_examples(str(out / '*.array_record'))) == good
  refused = subprocess.run(command[:3] + [f'--shards={tmp_path}/00001.tar', f'--out_dir={out}'], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120, check=False)
  assert refused.returncode == 1 and 'Error: --out_dir=' in refused.stderr and '--overwrite' in refused.stderr
