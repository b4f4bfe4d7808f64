"""Real-data readers on tiny files in the real formats, written here: Karpathy JSON + JPEGs, webdataset tars."""

import io
import json
import logging
import os
import tarfile

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs import flickr30k_cpu
from hivlp_jax import train
from hivlp_jax.data import flickr30k
from hivlp_jax.data import images
from hivlp_jax.data import scenes
from hivlp_jax.data import webdataset


def _jpeg(index: int) -> bytes:
  rng = np.random.default_rng(index)
  image = scenes.render(scenes.sample_scene(rng), 48, rng)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='JPEG')
  return buffer.getvalue()


def _write_flickr_manual_dir(root, splits):
  os.makedirs(root / flickr30k.IMAGES_DIR)
  images = []
  for i, split in enumerate(splits):
    (root / flickr30k.IMAGES_DIR / f'{1000 + i}.jpg').write_bytes(_jpeg(i))
    images.append({'filename': f'{1000 + i}.jpg', 'split': split, 'imgid': i,
                   'sentences': [{'raw': f'image {i} caption {c}', 'tokens': []} for c in range(5)]})
  (root / flickr30k.SPLITS_FILE).write_text(json.dumps({'images': images, 'dataset': 'flickr30k'}))


def test_flickr30k_builder_reads_karpathy_splits(tmp_path):
  manual = tmp_path / 'manual'
  _write_flickr_manual_dir(manual, ['train'] * 3 + ['restval'] * 2 + ['val'] * 2 + ['test'] * 4)
  builder = flickr30k.Flickr30k(data_dir=str(tmp_path / 'data'))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  sizes = {name: info.num_examples for name, info in builder.info.splits.items()}
  assert sizes == {'train': 5, 'validation': 2, 'test': 4}
  test = tfds.as_numpy(builder.as_dataset(split='test', batch_size=-1))
  assert test['image'].shape[1:] == (48, 48, 3)
  for filename, captions in zip(test['image/filename'], test['captions']):
    index = int(filename.decode()[:-4]) - 1000
    assert [c.decode() for c in captions] == [f'image {index} caption {c}' for c in range(5)]
    assert 7 <= index <= 10  # The test images are the last four.


def test_flickr30k_missing_manual_files_say_what_to_download(tmp_path):
  builder = flickr30k.Flickr30k(data_dir=str(tmp_path / 'data'))
  with pytest.raises(Exception, match='dataset_flickr30k.json'):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path)))


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _write_shards(root, num_shards=4, per_shard=5):
  """Shards of img2dataset layout; sample 00001 has a corrupt JPEG and 00007 an empty caption."""
  paths = []
  for shard in range(num_shards):
    path = root / f'{shard:05d}.tar'
    with tarfile.open(path, 'w') as tar:
      for j in range(per_shard):
        key = f'{shard * per_shard + j:05d}'
        image = b'\xff\xd8 not a jpeg' if key == '00001' else _jpeg(int(key))
        caption = '' if key == '00007' else f'caption of {key}'
        _add(tar, f'{key}.jpg', image)
        if j % 2:
          _add(tar, f'{key}.json', json.dumps({'caption': caption, 'url': 'x'}).encode())
        else:
          _add(tar, f'{key}.txt', caption.encode())
    paths.append(str(path))
  return paths


def _keys_and_problems(shards):
  return [(sample.key, sample.problem) for shard in shards for sample in webdataset.raw_samples(shard)]


def test_webdataset_reader_yields_every_sample_with_its_problem(tmp_path):
  shards = _write_shards(tmp_path)
  samples = [s for shard in shards for s in webdataset.raw_samples(shard)]
  assert [s.key for s in samples] == [f'{i:05d}' for i in range(20)]  # In order, bad ones included.
  assert {s.key: s.problem for s in samples if s.problem} == {'00007': 'empty_captions'}
  for sample in samples:
    if sample.key != '00007':
      assert sample.caption == f'caption of {sample.key}'
  # The corrupt JPEG is found by decoding it (in the stream's workers), not by reading.
  assert images.decode_for_eval(samples[1].image, 16) is None
  assert images.decode_for_eval(samples[0].image, 16).shape == (16, 16, 3)
  stats = webdataset.ReadStats(samples=18, corrupt_images=1, empty_captions=1)
  assert webdataset.count_by_reason(stats) == "18 samples read; skipped {'corrupt_images': 1, 'empty_captions': 1}"


def test_global_stats_sum_the_counts_of_every_process():
  stats = webdataset.ReadStats(samples=3 * 2**31 + 5, corrupt_images=1, corrupt_shards=2)
  three_hosts = lambda words: np.stack([words] * 3)  # Three processes with the same counts.
  total = webdataset.global_stats(stats, gather=three_hosts)
  assert total == webdataset.ReadStats(samples=9 * 2**31 + 15, corrupt_images=3, corrupt_shards=6)
  assert webdataset.global_stats(stats) == stats  # One process: its own counts.


def test_the_cpu_sized_flickr30k_config_trains_and_evaluates_on_a_karpathy_folder(tmp_path, caplog):
  """configs/flickr30k_cpu.py as shipped (only the step count, batch and paths shortened): it trains its own
  vocabulary, streams the folder, and evaluates the test split."""
  _write_flickr_manual_dir(tmp_path / 'manual', ['train'] * 24 + ['val'] * 2 + ['test'] * 6)
  config = flickr30k_cpu.get_config()
  config.data.manual_dir, config.data.data_dir = str(tmp_path / 'manual'), str(tmp_path / 'data')
  config.num_train_steps, config.batch_size, config.eval.batch_size = 2, 8, 8
  config.eval.latency_queries = 0
  with caplog.at_level(logging.INFO):
    results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert 'Trained a WordPiece vocabulary of' in caplog.text
  # The run records the vocabulary it got (a small corpus gives far fewer than the 8,000 asked).
  with open(tmp_path / 'run' / 'vocabulary.json') as f:
    record = json.load(f)
  assert record['asked'] == 8000 and 0 < record['tokens'] < 8000 and os.path.exists(record['file'])
  assert f"Vocabulary: {record['tokens']} tokens from" in caplog.text
  assert results['exact_dim256']['t2i_r10'] == 100.0  # 6 test images: every one is in a top 10.
  with open(tmp_path / 'run' / 'metrics.json') as f:
    assert json.load(f)['step'] == 2


def test_a_trained_vocabulary_is_keyed_by_the_training_data_not_the_name(tmp_path):
  """Two Flickr30K folders under one data_dir train two vocabularies; the same folder finds its own again."""
  from hivlp_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = flickr30k_cpu.get_config()
  config.data.data_dir = str(tmp_path / 'data')
  paths = {}
  for name, splits in (('a', ['train'] * 4 + ['test']), ('b', ['train'] * 5 + ['test'])):
    _write_flickr_manual_dir(tmp_path / name, splits)
    config.data.manual_dir = str(tmp_path / name)
    paths[name] = pipeline.vocab_file(config)
    assert pipeline.get_tokenizer(config).vocab_file == paths[name]
  assert paths['a'] != paths['b'] and os.path.exists(paths['a']) and os.path.exists(paths['b'])
  config.data.manual_dir = str(tmp_path / 'a')
  assert pipeline.vocab_file(config) == paths['a']
