"""Bad input, named and harmless: malformed Karpathy files, missing evaluation images, damaged web shards."""

import json
import logging
import os
import re
import tarfile

import jax
import numpy as np
import pytest

from configs import web_pretrain
from hivlp_jax import errors
from hivlp_jax import files
from hivlp_jax.data import convert_shards
from hivlp_jax.data import karpathy
from hivlp_jax.data import pipeline
from hivlp_jax.data import sources
from hivlp_jax.data import streaming
from hivlp_jax.data import tokenizer as tokenizer_lib
from hivlp_jax.data import webdataset
from tests.conftest import tiny_config
from tests.test_real_data import _add
from tests.test_real_data import _jpeg
from tests.test_real_data import _write_flickr_manual_dir
from tests.test_streaming import _data_config

SIZE = 16


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  texts = [f'caption of {i:05d}' for i in range(12)] + [f'image {i} caption {c}' for i in range(12) for c in range(5)]
  return tokenizer_lib.train_tokenizer(texts, str(tmp_path_factory.mktemp('vocab') / 'vocab.txt'), vocab_size=120)


# -- Karpathy split files.


def test_malformed_karpathy_files_name_the_file_entry_and_key(tmp_path):
  path = tmp_path / 'dataset_flickr30k.json'
  good = {'filename': '1.jpg', 'split': 'test', 'sentences': [{'raw': 'a dog'}]}
  cases = [
      ({'dataset': 'flickr30k'}, "has no 'images' list"),
      ({'images': [good, {'split': 'test', 'sentences': []}]}, r"images\[1\] has no 'filename'"),
      ({'images': [good, good, dict(good, split='')]}, r"images\[2\] has no 'split'"),
      ({'images': [{'filename': '1.jpg', 'split': 'train'}]}, r"images\[0\] has no 'sentences'"),
      ({'images': [dict(good, sentences=[{'raw': 'a'}, {'tokens': ['a']}])]},
       r"images\[0\]\['sentences'\]\[1\] has no 'raw'"),
  ]
  for data, message in cases:
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(str(path)) + '.*' + message):
      karpathy.read_split(str(path), 'test')
  path.write_text('{"images": [')
  with pytest.raises(ValueError, match='is not valid JSON'):
    karpathy.read_split(str(path), 'test')
  path.write_text(json.dumps({'images': [good]}))  # COCO entries also need their folder.
  with pytest.raises(ValueError, match=r"images\[0\] has no 'filepath'"):
    karpathy.read_split(str(path), 'test', needs_filepath=True)


def test_empty_captions_are_dropped_counted_and_their_images_skipped_in_training(tmp_path, tokenizer, caplog):
  manual = tmp_path / 'manual'
  _write_flickr_manual_dir(manual, ['train'] * 6)
  split_file = manual / 'dataset_flickr30k.json'
  data = json.loads(split_file.read_text())
  data['images'][1]['sentences'][2]['raw'] = '  '
  for sentence in data['images'][4]['sentences']:
    sentence['raw'] = ''
  split_file.write_text(json.dumps(data))
  os.remove(manual / 'flickr30k-images' / '1003.jpg')
  with caplog.at_level(logging.WARNING):
    entries = karpathy.read_split(str(split_file), 'train')
  assert [len(e['captions']) for e in entries] == [5, 4, 5, 5, 0, 5]
  assert 'dropped 6 empty captions of the train split (images[1, 4])' in caplog.text
  config = _data_config('flickr30k', manual)
  with caplog.at_level(logging.WARNING), streaming.create_train_stream(config, tokenizer) as stream:
    for _ in range(2):  # Each batch: the 4 usable images of an epoch.
      next(stream)
    stats = stream.stats
  # Epoch 0's skips are consumed by now; epoch 1's, when they come before its last usable image.
  assert stats.samples == 8 and 1 <= stats.empty_captions <= 2 and 1 <= stats.missing_parts <= 2
  assert 'skipped an example (missing_parts): ' + str(manual / 'flickr30k-images' / '1003.jpg') in caplog.text
  assert re.search(r'skipped an example \(empty_captions\): .*1004\.jpg', caplog.text)


# -- The evaluation split, checked before training.


def test_check_split_names_missing_evaluation_images(tmp_path, tokenizer):
  manual = tmp_path / 'manual'
  _write_flickr_manual_dir(manual, ['train'] * 3 + ['test'] * 4)
  config = _data_config('flickr30k', manual)
  assert pipeline.check_split(config, 'test', tokenizer) == 4
  for i in (4, 6):
    os.remove(manual / 'flickr30k-images' / f'100{i}.jpg')
  with pytest.raises(FileNotFoundError, match=r"2 of the 4 flickr30k test images are missing, e.g. \['.*1004.jpg', "
                                              r"'.*1006.jpg'\]"):
    pipeline.check_split(config, 'test', tokenizer)
  damaged = tmp_path / 'damaged'
  _write_flickr_manual_dir(damaged, ['train'] * 3 + ['test'] * 4)
  (damaged / 'flickr30k-images' / '1005.jpg').write_bytes(b'not a JPEG')  # Found before training, not after.
  with pytest.raises(errors.InputError, match=r"1 of the 4 flickr30k test images are not readable images, e.g. "
                                              r"\['.*1005.jpg'\]"):
    pipeline.check_split(_data_config('flickr30k', damaged), 'test', tokenizer)
  assert pipeline.check_split(config, 'train', tokenizer) == 3
  config.data.captions_per_image = 6
  with pytest.raises(ValueError, match='3 flickr30k train images have fewer than 6 captions'):
    pipeline.check_split(config, 'train', tokenizer)
  config.data.update(name='webdataset', eval_name='')
  with pytest.raises(ValueError, match='Web shards have no evaluation split'):
    pipeline.check_split(config, 'test', tokenizer)
  # The embedded data set: the split's size, without building anything.
  embedded = tiny_config(str(tmp_path / 'nothing_built'))
  assert pipeline.check_split(embedded, 'test', tokenizer) == 64
  assert not os.path.exists(tmp_path / 'nothing_built')
  with pytest.raises(ValueError, match="Unknown split 'testing'"):
    pipeline.check_split(embedded, 'testing', tokenizer)


def test_one_line_errors_end_only_input_errors_and_a_file_is_no_workdir(tmp_path):
  @errors.one_line_errors
  def main(error):
    raise error

  with pytest.raises(SystemExit, match=r'^Error: no vocab\.txt$'):
    main(errors.MissingInputError('no vocab.txt'))
  with pytest.raises(ValueError, match='a bug'):  # Not an InputError: the traceback stays.
    main(ValueError('a bug'))
  (tmp_path / 'run').write_text('notes')
  with pytest.raises(errors.InputError, match=r"--workdir='.*run' is a file, not a folder"):
    files.make_dir(tmp_path / 'run')
  assert files.make_dir(tmp_path / 'a' / 'b').is_dir()


def test_the_trained_vocabulary_is_named_by_its_size(tmp_path):
  config = tiny_config(str(tmp_path))
  small = pipeline.vocab_file(config)
  config.data.vocab_size = 50
  assert pipeline.vocab_file(config) != small and pipeline.vocab_file(config).endswith('vocab50.txt')


def test_the_trained_vocabulary_size_is_logged_and_a_different_one_warned(tmp_path, caplog):
  captions = ['a small red circle', 'two large blue squares', 'a green triangle left of a circle'] * 3
  with caplog.at_level(logging.INFO):
    trained = tokenizer_lib.train_tokenizer(captions, str(tmp_path / 'vocab.txt'), vocab_size=10)
  warning, = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert trained.vocab_size > 10  # Every character seen is kept.
  assert f'vocabulary of {trained.vocab_size} tokens (vocab_size=10 asked)' in warning.getMessage()


# -- Damaged web shards.


def _write_tar(path, keys, meta=None) -> str:
  """A shard whose samples have `<key>.jpg` and `<key>.json`; meta: {key: the .json bytes}, else a caption."""
  with tarfile.open(path, 'w') as tar:
    for key in keys:
      _add(tar, f'{key}.jpg', _jpeg(int(key)))
      _add(tar, f'{key}.json', (meta or {}).get(key, json.dumps({'caption': f'caption of {key}'}).encode()))
  return str(path)


def _write_damaged_shards(root) -> list[str]:
  """A whole shard (keys 0-3), one cut inside the image of key 6, one whose key 9 has a malformed .json."""
  whole = _write_tar(root / 'whole.tar', [f'{i:05d}' for i in range(4)])
  full = _write_tar(root / 'full.tar', [f'{i:05d}' for i in range(4, 8)])
  with tarfile.open(full) as tar:
    image = tar.getmember('00006.jpg')
  data = (root / 'full.tar').read_bytes()
  os.remove(full)
  (root / 'truncated.tar').write_bytes(data[:image.offset_data + image.size // 2])
  malformed = _write_tar(root / 'malformed.tar', [f'{i:05d}' for i in range(8, 12)], {'00009': b'{"caption": "cap'})
  return [whole, str(root / 'truncated.tar'), malformed]


def _keys_and_problems(shard):
  return [(sample.key, sample.problem) for sample in webdataset.raw_samples(shard)]


def test_damaged_shards_keep_their_good_samples(tmp_path):
  whole, truncated, malformed = _write_damaged_shards(tmp_path)
  assert _keys_and_problems(truncated) == [('00004', ''), ('00005', ''), ("after '00005'", 'corrupt_shards')]
  assert 'ReadError' in list(webdataset.raw_samples(truncated))[-1].detail
  assert _keys_and_problems(malformed) == [('00008', ''), ('00009', 'malformed_json'), ('00010', ''), ('00011', '')]
  # Cut at a member boundary, or garbage in a header: tarfile alone would end the archive without a word.
  data = open(whole, 'rb').read()
  with tarfile.open(whole) as tar:
    boundary = tar.getmember('00001.jpg').offset
  for name, damaged in (('cut', data[:boundary]), ('garbage', data[:boundary] + b'x' * 512 + data[boundary + 512:])):
    (tmp_path / f'{name}.tar').write_bytes(damaged)
    assert _keys_and_problems(str(tmp_path / f'{name}.tar')) == [('00000', ''), ("after '00000'", 'corrupt_shards')]
  assert _keys_and_problems(str(tmp_path / 'absent.tar')) == [('at its start', 'corrupt_shards')]


def test_damaged_shards_are_converted_counted_and_named_then_train_and_give_a_vocabulary(tmp_path, tokenizer, caplog):
  shards = _write_damaged_shards(tmp_path)  # 9 usable samples; a damaged shard and a bad .json.
  with caplog.at_level(logging.WARNING):
    conversion = convert_shards.convert(','.join(shards), str(tmp_path / 'converted'))
  assert conversion['stats'] == dict(webdataset.ReadStats(samples=9, corrupt_shards=1, malformed_json=1).as_dict())
  assert re.search(r"truncated or corrupt shard, .*truncated\.tar: after '00005' \(ReadError", caplog.text)
  assert re.search(r'skipped an example \(malformed_json\): .*malformed\.tar: 00009 \(00009\.json: ', caplog.text)
  pattern = str(tmp_path / 'converted' / '*.array_record')
  options = dict(global_batch=4, image_size=SIZE, max_len=8, seed=0, num_workers=1, prefetch=1)
  with streaming.TrainStream(sources.webdataset_source(pattern), tokenizer, **options) as stream:
    batches = [jax.tree.map(np.asarray, next(stream)) for _ in range(5)]  # Into the third epoch.
    state = stream.get_state()
  keys = [tokenizer.decode(t).split()[-1] for b in batches for t in b['text'].reshape(-1, 8)]
  assert sorted(keys[:9]) == sorted(f'{i:05d}' for i in (0, 1, 2, 3, 4, 5, 8, 10, 11))
  assert webdataset.ReadStats.from_dict(state['stats']) == webdataset.ReadStats(samples=20)

  # The vocabulary pass reads the converted files.
  config = web_pretrain.get_config()
  config.data.update(shards=pattern, vocab_file='', vocab_size=100, data_dir=str(tmp_path / 'data'))
  caplog.clear()
  with caplog.at_level(logging.INFO):
    trained = pipeline.get_tokenizer(config)
  assert 'caption' in tokenizer_lib.read_vocab(trained.vocab_file)  # Trained on the shards' captions.
  assert 'Vocabulary captions of webdataset: 9 samples read.' in caplog.text


def test_skip_log_names_the_first_examples_then_only_damaged_shards(caplog):
  log = sources.SkipLog('Test data', limit=2)
  taken = [log.take(p) for p in ('corrupt_images', 'corrupt_shards', 'missing_parts', 'empty_captions',
                                 'corrupt_shards')]
  assert taken == [True, True, True, False, True]
  with caplog.at_level(logging.WARNING):
    log.log('corrupt_images', 'a.tar: 1')
    log.log('missing_parts', 'a.tar: 2')
  assert 'a.tar: 1' in caplog.text and 'further skipped examples are only counted' in caplog.text
