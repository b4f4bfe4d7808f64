"""The streaming pipeline (grain) on tiny files in the real formats: web shards, Karpathy JSON + JPEGs, TFDS builds."""

import collections
import importlib
import io
import json
import os

import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from hivlp_jax.data import eval_splits
from hivlp_jax.data import images
from hivlp_jax.data import karpathy
from hivlp_jax.data import pipeline
from hivlp_jax.data import sources
from hivlp_jax.data import streaming
from hivlp_jax.data import tokenizer as tokenizer_lib
from hivlp_jax.data import webdataset
from tests.test_real_data import _jpeg
from tests.test_real_data import _write_flickr_manual_dir
from tests.test_real_data import _write_shards

SIZE = 16


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  texts = [f'caption of {i:05d}' for i in range(40)] + [f'image {i} caption {c}' for i in range(20) for c in range(7)]
  return tokenizer_lib.train_tokenizer(texts, str(tmp_path_factory.mktemp('vocab') / 'vocab.txt'), vocab_size=200)


def _stream(source, tokenizer, **kwargs):
  options = dict(global_batch=8, image_size=SIZE, max_len=8, seed=3, num_workers=2, prefetch=2)
  options.update(kwargs)
  return streaming.TrainStream(source, tokenizer, **options)


def _take(stream, n):
  with stream:
    batches = []
    for _ in range(n):
      batches.append(jax.tree.map(np.asarray, next(stream)))
      batches[-1]['state'] = stream.get_state()
  return batches


def _web_source(paths):
  """Web shards' samples, bad ones included, as a source in memory (training reads them converted to ArrayRecord,
  which keeps only the usable ones; here the stream's skipping is under test)."""
  return sources.Source('webdataset', [
      sources.RawExample(s.key, s.image, (s.caption,) if s.caption else (), s.problem, origin=path, detail=s.detail)
      for path in paths for s in webdataset.raw_samples(path)])


def _keys(tokenizer, batch):
  """The sample key (web shards) or image index (Karpathy) named in each caption of a batch."""
  return [tokenizer.decode(t).split()[-1] if 'of' in tokenizer.decode(t) else tokenizer.decode(t).split()[1]
          for t in batch['text'].reshape(-1, batch['text'].shape[-1])]


# -- Image ops.


def test_random_resized_crop_box_keeps_scale_and_aspect():
  rng = np.random.default_rng(0)
  for _ in range(200):
    left, top, right, bottom = images.random_resized_crop_box(300, 400, rng, scale=(0.5, 1.0))
    w, h = right - left, bottom - top
    assert 0 <= left < right <= 400 and 0 <= top < bottom <= 300
    assert 0.49 <= w * h / (300 * 400) <= 1.0
    assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
  # A strip no crop fits: the centred crop of the widest allowed aspect.
  assert images.random_resized_crop_box(10, 400, rng, scale=(0.9, 1.0)) == (193, 0, 206, 10)


def test_decoded_transforms_equal_the_array_ops_and_are_deterministic():
  data, size = _jpeg(5), 32  # 48 px to 32: decoded at full scale.
  image = np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))
  fused = images.decode_for_training(data, size, np.random.default_rng(7))
  np.testing.assert_array_equal(fused, images.random_resized_crop(image, size, np.random.default_rng(7)))
  np.testing.assert_array_equal(fused, images.decode_for_training(data, size, np.random.default_rng(7)))
  assert not np.array_equal(fused, images.decode_for_training(data, size, np.random.default_rng(8)))
  np.testing.assert_array_equal(images.decode_for_eval(data, size), images.resize_and_center_crop(image, size))
  assert fused.shape == (size, size, 3) and fused.dtype == np.uint8
  assert images.decode_for_training(b'\xff\xd8 not a jpeg', size, np.random.default_rng(0)) is None


def test_the_flip_and_the_aspect_range_are_settings():
  data, size = _jpeg(5), 32
  flips = [images.Augment().flipped(np.random.default_rng(seed)) for seed in range(8)]
  seed = flips.index(True)  # A generator whose draw mirrors the crop.
  mirrored = images.decode_for_training(data, size, np.random.default_rng(seed))
  kept = images.decode_for_training(data, size, np.random.default_rng(seed), images.Augment(flip=False))
  np.testing.assert_array_equal(kept, mirrored[:, ::-1])  # The same crop, not mirrored.
  square = images.Augment(scale=(0.3, 0.6), ratio=(1.0, 1.0))
  for seed in range(5):
    left, top, right, bottom = images.random_resized_crop_box(300, 400, np.random.default_rng(seed), square.scale,
                                                              square.ratio)
    assert abs((right - left) - (bottom - top)) <= 1


def test_large_jpegs_decode_at_reduced_scale_close_to_full():
  image = np.asarray(Image.fromarray(np.asarray(Image.open(io.BytesIO(_jpeg(1))))).resize((400, 300)))
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='JPEG', quality=95)
  reduced = images.decode_for_eval(buffer.getvalue(), 32)  # 300 / 32 >= 8: decoded at 1/8 scale.
  full = images.resize_and_center_crop(image, 32)
  assert np.abs(reduced.astype(int) - full).mean() < 6


# -- Web shards.


def test_web_stream_batches_in_pmap_layout_and_counts_bad_samples(tmp_path, tokenizer):
  with pytest.raises(ValueError, match=r'names webdataset tars.*python -m hivlp_jax.data.convert_shards'):
    sources.webdataset_source(str(tmp_path / '{00000..00003}.tar'))
  source = _web_source(_write_shards(tmp_path))
  with _stream(source, tokenizer) as stream:
    batches = [next(stream) for _ in range(3)]  # 24 of the 18 good samples a pass: into epoch 1.
    stats = stream.stats.as_dict()
  devices = jax.local_device_count()
  assert batches[0]['image'].shape == (devices, 8 // devices, SIZE, SIZE, 3)
  assert batches[0]['image'].dtype == np.uint8
  assert batches[0]['text'].shape == (devices, 8 // devices, 8) and batches[0]['text'].dtype == np.int32
  epoch0 = [k for b in batches for k in _keys(tokenizer, b)][:18]
  assert sorted(epoch0) == sorted(f'{i:05d}' for i in range(20) if i not in (1, 7))
  assert stats['corrupt_images'] >= 1 and stats['empty_captions'] >= 1


def test_resumed_stream_continues_the_data_order(tmp_path, tokenizer):
  source = _web_source(_write_shards(tmp_path))
  straight = _take(_stream(source, tokenizer), 7)  # About 3 epochs of 18 good samples.
  resumed = _take(_stream(source, tokenizer, state=straight[2]['state']), 4)
  for a, b in zip(straight[3:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['text'], b['text'])
    assert a['state'] == b['state']  # Counts included: the resumed stream goes on counting.
  assert json.loads(json.dumps(straight[2]['state'])) == straight[2]['state']
  # The counts are of the batches returned, not of the examples the workers and the queue read ahead.
  assert [b['state']['stats']['samples'] for b in straight] == [8 * (i + 1) for i in range(7)]
  # Neither the order nor the augmentation depends on the number of decode threads, or on having none.
  for threads in (0, 5):
    other = _take(_stream(source, tokenizer, num_workers=threads), 3)
    np.testing.assert_array_equal(other[2]['image'], straight[2]['image'])
  # A transform (e.g. masking) draws from a generator seeded by the batch's first example: resumed, it repeats.
  def mask(rng, batch):
    return dict(batch, mask=rng.random(batch['text'].shape) < 0.5)
  masks = [b['mask'] for b in _take(_stream(source, tokenizer, transform=mask), 5)[3:]]
  resumed = _take(_stream(source, tokenizer, transform=mask, state=straight[2]['state']), 2)
  np.testing.assert_array_equal(np.stack(masks), np.stack([b['mask'] for b in resumed]))
  assert masks[0].shape == (jax.local_device_count(), 8 // jax.local_device_count(), 8)
  # A shuffled order that covers every good sample once per epoch.
  keys = [k for b in straight for k in _keys(tokenizer, b)]
  assert sorted(keys[:18]) == sorted(keys[18:36]) and keys[:18] != keys[18:36]


def test_state_of_another_stream_is_refused(tmp_path, tokenizer):
  source = _web_source(_write_shards(tmp_path))
  state = _take(_stream(source, tokenizer), 1)[0]['state']
  with pytest.raises(ValueError, match=r"changed \(saved, now\): \{'seed': \(3, 4\)\}"):
    _stream(source, tokenizer, seed=4, state=state)
  with pytest.raises(ValueError, match=r"changed \(saved, now\): \{'worker_processes': \(0, 2\)\}"):
    _stream(source, tokenizer, worker_processes=2, state=state)


def test_hosts_stream_disjoint_shares_and_each_resumes_its_own(tmp_path, tokenizer):
  source = _web_source(_write_shards(tmp_path))
  keys = []
  for host in range(2):
    hosts = dict(global_batch=8, process_index=host, process_count=2)
    batches = _take(_stream(source, tokenizer, **hosts), 4)
    keys.append({k for b in batches[:2] for k in _keys(tokenizer, b)})
    assert batches[0]['image'].shape[:2] == (jax.local_device_count(), 1)  # Local batch 4.
    resumed = _take(_stream(source, tokenizer, **hosts, state=batches[1]['state']), 2)
    for a, b in zip(batches[2:], resumed):
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['text'], b['text'])
    with pytest.raises(ValueError, match=r"'process_index': \({}, {}\)".format(host, 1 - host)):
      _stream(source, tokenizer, global_batch=8, process_index=1 - host, process_count=2, state=batches[1]['state'])
  assert keys[0] and keys[1] and not keys[0] & keys[1]


def test_device_prefetch_keeps_the_state_of_the_batch_returned(tmp_path, tokenizer):
  source = _web_source(_write_shards(tmp_path))
  host = _take(_stream(source, tokenizer), 3)
  with _stream(source, tokenizer, device_prefetch=2) as stream:
    for expected in host:
      batch = next(stream)
      assert isinstance(batch['image'], jax.Array) and len(batch['image'].sharding.device_set) == 4
      np.testing.assert_array_equal(np.asarray(batch['image']), expected['image'])
      assert stream.get_state() == expected['state']


def test_the_data_state_is_saved_in_the_orbax_checkpoint(tmp_path, tokenizer):
  from hivlp_jax import checkpointing  # pylint: disable=g-import-not-at-top
  state = _take(_stream(_web_source(_write_shards(tmp_path)), tokenizer), 2)[1]['state']
  checkpoints = checkpointing.Checkpoints(str(tmp_path / 'run'), max_to_keep=3)
  checkpoints.save(5, {'step': np.full((), 5, np.int32)}, state)
  checkpoints.save(6, {'step': np.full((), 6, np.int32)})  # An in-memory data set's checkpoint: no data state.
  checkpoints.close()
  assert os.path.exists(tmp_path / 'run/checkpoints/5/data/process_0-of-1.json')
  assert checkpoints.data_state(5) == state and checkpoints.data_state(6) is None
  assert checkpoints.restore_latest({'step': np.zeros((), np.int32)}) == {'step': 6}
  (tmp_path / 'run/checkpoints/6').rename(tmp_path / 'run/checkpoints_6')
  older = checkpointing.Checkpoints(str(tmp_path / 'run'), 3)  # Step 5 is now the newest: its data state is read.
  assert older.restore_latest({'step': np.zeros((), np.int32)}) == {'step': 5} and older.data_state(5) == state


# -- Flickr30K and COCO.


def _write_coco_manual_dir(root, splits, captions_per_image=5):
  """dataset_coco.json in Karpathy's format: images in train2014/ or val2014/ named by 'filepath'."""
  for folder in karpathy.COCO.images_dirs:
    os.makedirs(root / folder)
  entries = []
  for i, split in enumerate(splits):
    folder = 'train2014' if split == 'train' else 'val2014'
    filename = f'COCO_{folder}_{i:012d}.jpg'
    (root / folder / filename).write_bytes(_jpeg(i))
    count = captions_per_image + (i == len(splits) - 1)  # Some COCO images have 6 or 7 captions.
    entries.append({'filepath': folder, 'filename': filename, 'split': split, 'cocoid': i, 'imgid': i,
                   'sentences': [{'raw': f'image {i} caption {c}.', 'tokens': [], 'sentid': c} for c in range(count)]})
  (root / karpathy.COCO.splits_file).write_text(json.dumps({'images': entries, 'dataset': 'coco'}))


def _data_config(name, manual_dir, **data):
  config = importlib.import_module(f'configs.{name}').get_config()
  config.data.manual_dir = str(manual_dir)
  config.data.update(data)
  config.model.image_size, config.model.text.max_len, config.batch_size = SIZE, 8, 4
  config.data.num_workers = 2
  config.data.device_prefetch = 0
  return config


@pytest.mark.parametrize('worker_processes', [0, 1, 2])
def test_karpathy_and_converted_web_streams_resume_bit_for_bit(tmp_path, tokenizer, worker_processes):
  """A stream created from the state after batch 2 yields batches 3-5 of the uninterrupted one, for the two
  random-access formats users train on, with threads and with grain worker processes."""
  from hivlp_jax.data import convert_shards  # pylint: disable=g-import-not-at-top
  _write_coco_manual_dir(tmp_path / 'coco', ['train'] * 9 + ['restval'] * 4 + ['test'] * 2)
  (tmp_path / 'web').mkdir()
  convert_shards.convert(','.join(_write_shards(tmp_path / 'web')), str(tmp_path / 'web_ar'))
  formats = {'karpathy': sources.karpathy_source('coco', str(tmp_path / 'coco')),
             'web': sources.webdataset_source(str(tmp_path / 'web_ar' / '*.array_record'))}
  for name, source in formats.items():
    options = dict(num_workers=1, worker_processes=worker_processes)
    straight = _take(_stream(source, tokenizer, **options), 5)
    resumed = _take(_stream(source, tokenizer, **options, state=straight[1]['state']), 3)
    for a, b in zip(straight[2:], resumed):
      for key in ('image', 'text', 'image_id'):
        np.testing.assert_array_equal(a[key], b[key], err_msg=f'{name} {key}')
      assert a['state'] == b['state'], name
    # 40 examples are 3 epochs of either: every usable one is seen (web: the conversion kept 19, one a corrupt JPEG).
    assert len({k for b in straight for k in _keys(tokenizer, b)}) == {'karpathy': 13, 'web': 18}[name]


def test_coco_karpathy_stream_is_a_permutation_of_train_and_restval(tmp_path, tokenizer):
  _write_coco_manual_dir(tmp_path, ['train'] * 5 + ['restval'] * 3 + ['val'] * 2 + ['test'] * 3)
  config = _data_config('coco', tmp_path)
  with streaming.create_train_stream(config, tokenizer) as stream:
    batches = [next(stream) for _ in range(4)]  # 2 epochs of the 8 training images.
    state = stream.get_state()
  keys = [int(k) for b in batches for k in _keys(tokenizer, b)]
  assert sorted(keys[:8]) == list(range(8)) and sorted(keys[8:]) == list(range(8)) and keys[:8] != keys[8:]
  assert state['grain'] and {k: v for k, v in state.items() if k != 'grain'} == {
      'seed': 0, 'process_index': 0, 'process_count': 1, 'num_examples': 8, 'source': 'coco', 'worker_processes': 0,
      'stats': {'samples': 16, 'corrupt_images': 0, 'empty_captions': 0, 'missing_parts': 0, 'malformed_json': 0,
                'corrupt_shards': 0, 'corrupt_videos': 0}}

  test = eval_splits.load_eval_split(config, 'test', tokenizer)
  assert test.images.shape == (3, SIZE, SIZE, 3) and test.tokens.shape == (3, 5, 8)
  assert test.captions[2] == [f'image 12 caption {c}.' for c in range(5)]  # The 6th caption is left out.
  assert tokenizer.decode(test.tokens[0, 1]).startswith('image 10 caption 1')
  config.data.captions_per_image = 6
  with pytest.raises(ValueError, match='2 coco test images have fewer than 6 captions'):
    eval_splits.load_eval_split(config, 'test', tokenizer)


def test_missing_manual_files_say_what_to_download(tmp_path, tokenizer):
  config = _data_config('coco', tmp_path / 'nothing')
  with pytest.raises(FileNotFoundError, match=r"'train2014', 'val2014'.*'dataset_coco.json'.*caption_datasets.zip"):
    streaming.create_train_stream(config, tokenizer)
  config = _data_config('flickr30k', tmp_path / 'nothing')
  with pytest.raises(FileNotFoundError, match="'flickr30k-images'.*dataset_flickr30k.json"):
    eval_splits.load_eval_split(config, 'test', tokenizer)
  config = _data_config('coco', tmp_path, source='tfds', data_dir=str(tmp_path / 'tfds'))
  with pytest.raises(FileNotFoundError, match='tfds build coco_captions --file_format=array_record'):
    streaming.create_train_stream(config, tokenizer)


def test_flickr30k_through_the_tfds_builder(tmp_path, tokenizer):
  manual = tmp_path / 'manual'
  _write_flickr_manual_dir(manual, ['train'] * 6 + ['val'] * 1 + ['test'] * 2)
  config = _data_config('flickr30k', manual, source='tfds', data_dir=str(tmp_path / 'tfds'))
  with streaming.create_train_stream(config, tokenizer) as stream:
    keys = [int(k) for _ in range(3) for k in _keys(tokenizer, next(stream))]
  assert sorted(keys[:6]) == list(range(6))
  assert pipeline.check_split(config, 'test', tokenizer) == 2  # From the build's split sizes.
  test = eval_splits.load_eval_split(config, 'test', tokenizer)
  direct = eval_splits.load_eval_split(_data_config('flickr30k', manual), 'test', tokenizer)
  order = np.argsort([c[0] for c in test.captions])  # TFDS stores in hashed-key order.
  np.testing.assert_array_equal(test.images[order], direct.images)
  np.testing.assert_array_equal(test.tokens[order], direct.tokens)
  # A build in TFDS's default TFRecord format (one prepared before training read at random) is named.
  from hivlp_jax.data import flickr30k  # pylint: disable=g-import-not-at-top
  flickr30k.Flickr30k(data_dir=str(tmp_path / 'tfrecord')).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  config.data.data_dir = str(tmp_path / 'tfrecord')
  with pytest.raises(ValueError, match=r'not in the ArrayRecord format.*--file_format=array_record'):
    streaming.create_train_stream(config, tokenizer)


def test_coco_captions_tfds_features_map_to_examples(tmp_path):
  builder = tfds.builder('coco_captions/2014', data_dir=str(tmp_path))  # Its code's features; no download.
  features = builder.info.features
  assert {'image', 'image/filename', 'captions'} <= set(features) and 'text' in features['captions'].feature
  example = {'image': _jpeg(0), 'image/filename': b'COCO_val2014_000000000042.jpg', 'image/id': 42,
             'captions': {'text': np.array([b'A dog. ', b'', b'A cat.']), 'id': np.array([1, 2, 3])}}
  raw = sources.tfds_example(example)
  assert raw.key == 'COCO_val2014_000000000042.jpg' and raw.captions == ('A dog.', 'A cat.') and not raw.problem
  assert sources.TFDS_SPLITS['coco']['train'] == ('train', 'restval')
  assert set(builder.info.splits) <= {'train', 'val', 'test', 'restval'}


def test_an_empty_share_or_an_epoch_without_a_usable_example_is_named(tmp_path, tokenizer):
  examples = _web_source(_write_shards(tmp_path)).examples
  with pytest.raises(RuntimeError, match='webdataset has 1 examples: none for host 1 of 2'):
    _stream(sources.Source('webdataset', examples[:1]), tokenizer, process_index=1, process_count=2)
  bad = [examples[1], examples[7]]  # A corrupt JPEG and an empty caption.
  with _stream(sources.Source('webdataset', bad), tokenizer, num_workers=0) as stream:
    with pytest.raises(RuntimeError, match=r"whole epoch of the 2 examples of webdataset .*gave no usable example"):
      next(stream)


def test_worker_processes_resume_their_order(tmp_path, tokenizer):
  source = _web_source(_write_shards(tmp_path))
  straight = _take(_stream(source, tokenizer, num_workers=1, worker_processes=2), 5)
  resumed = _take(_stream(source, tokenizer, num_workers=1, worker_processes=2, state=straight[1]['state']), 3)
  for a, b in zip(straight[2:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['text'], b['text'])
    assert a['state'] == b['state']
  # Two processes share the order, each batching its own share: 40 examples are 2.2 epochs of the 18 usable
  # ones, so each shows up 2 or 3 times (an order that repeated or lost examples would not).
  counts = collections.Counter(k for b in straight for k in _keys(tokenizer, b))
  assert set(counts) == {f'{i:05d}' for i in range(20) if i not in (1, 7)} and set(counts.values()) <= {2, 3}


def _final_params(workdir):
  """The parameters and step of the newest checkpoint in `workdir`."""
  from hivlp_jax import checkpointing  # pylint: disable=g-import-not-at-top
  checkpoints = checkpointing.Checkpoints(workdir, 2, create=False)
  step = max(checkpoints.all_steps())
  return checkpoints.restore(step)['params'], step


def test_training_on_flickr30k_resumes_its_data_order(tmp_path):
  """train_and_evaluate on a Karpathy-format Flickr30K: stopped at step 3 and resumed, it equals a straight run."""
  from configs import flickr30k  # pylint: disable=g-import-not-at-top
  from hivlp_jax import train  # pylint: disable=g-import-not-at-top
  from tests.conftest import tiny_config  # pylint: disable=g-import-not-at-top
  _write_flickr_manual_dir(tmp_path / 'manual', ['train'] * 10 + ['restval'] * 2 + ['val'] * 2 + ['test'] * 4)
  config = flickr30k.add_streaming_data_fields(tiny_config(str(tmp_path / 'data')))
  config.data.update(name='flickr30k', manual_dir=str(tmp_path / 'manual'), vocab_file='', vocab_size=60,
                     num_workers=2, device_prefetch=0)
  config.batch_size, config.eval.batch_size = 8, 4  # 12 training images: epochs end mid-batch.
  config.model.image.depth = config.model.text.depth = 1  # Compiles faster; the data order is under test.
  config.eval.two_stage, config.eval.funnel = (), ()
  config.eval.latency_queries = 0  # Recall only: timings differ from run to run.
  straight, interrupted = str(tmp_path / 'straight'), str(tmp_path / 'interrupted')
  results = train.train_and_evaluate(config, straight)
  assert train.train_and_evaluate(config, interrupted, stop_after_step=3) is None
  assert os.path.exists(os.path.join(interrupted, 'checkpoints', '3', 'data', 'process_0-of-1.json'))
  assert train.train_and_evaluate(config, interrupted) == results
  (params_a, step_a), (params_b, step_b) = _final_params(straight), _final_params(interrupted)
  assert step_a == step_b == 6
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)
  assert results['exact_dim64']['i2t_r10'] == 100.0  # 4 test images: every image is in the top 10.
