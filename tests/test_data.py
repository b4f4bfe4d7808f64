"""The embedded data set: deterministic, distinct scenes, captions that describe their images."""

import numpy as np
import pytest
from tokenizers import BertWordPieceTokenizer

from hivlp_jax.data import embedded_scenes
from hivlp_jax.data import pipeline
from hivlp_jax.data import scenes
from hivlp_jax.data import tokenizer as tokenizer_lib


def _words(caption):
  return ' ' + caption + ' '


def test_examples_are_deterministic():
  objects = scenes.generate_scenes('test', 20)
  assert objects == scenes.generate_scenes('test', 20)
  a = scenes.make_example('test', 7, objects[7], 32)
  b = scenes.make_example('test', 7, objects[7], 32)
  np.testing.assert_array_equal(a['image'], b['image'])
  assert a['captions'] == b['captions']


def test_scenes_are_distinct_within_and_across_splits():
  keys = {split: [scenes.scene_key(s) for s in scenes.generate_scenes(split, n)]
          for split, n in (('train', 3000), ('validation', 300), ('test', 1000))}
  for split, split_keys in keys.items():
    assert len(set(split_keys)) == len(split_keys), split
  assert not set(keys['train']) & set(keys['test'])
  assert not set(keys['validation']) & set(keys['test'])


def assert_captions_describe(captions, objects):
  """Five different captions, each naming every object in one phrase with all four of its attributes."""
  assert len(captions) == scenes.NUM_CAPTIONS == len(set(captions))
  for caption in captions:
    phrases = caption.replace(' with ', ' and ').replace(' , ', ' and ').split(' and ')
    for obj in objects:
      assert any(
          any(f' {w} ' in _words(p) for w in scenes.SHAPE_WORDS[obj.shape]) and
          any(f' {w} ' in _words(p) for w in scenes.COLOUR_WORDS[obj.colour]) and
          any(f' {w} ' in _words(p) for w in scenes.SIZE_WORDS[obj.size]) and
          any(f' {w} ' in _words(p.replace(' : ', ' ')) for w in scenes.CELL_WORDS[scenes.CELLS[obj.cell]])
          for p in phrases), (caption, obj)
    assert caption.count(' a ') + caption.startswith('a ') >= len(objects)


def assert_objects_drawn(image, objects, what):
  """Each object's colour shows in a few pixels of its cell of `image` uint8 [32, 32, 3]."""
  image = image.astype(int)
  for obj in objects:
    row, col = divmod(obj.cell, 3)
    cell = image[int(row * 32 / 3):int((row + 1) * 32 / 3), int(col * 32 / 3):int((col + 1) * 32 / 3)]
    distance = np.abs(cell - np.array(scenes.RGB[obj.colour])).sum(-1)
    assert (distance < 80).sum() >= 4, (what, obj)


def test_every_caption_names_every_object_with_all_attributes():
  for index, objects in enumerate(scenes.generate_scenes('test', 200)):
    assert_captions_describe(scenes.make_example('test', index, objects, 32)['captions'], objects)


def test_rendered_objects_have_their_colour_at_their_cell():
  for index, objects in enumerate(scenes.generate_scenes('test', 100)):
    assert_objects_drawn(scenes.make_example('test', index, objects, 32)['image'], objects, index)


def test_images_sharing_an_attribute_do_not_share_a_caption():
  all_captions = {}
  for index, objects in enumerate(scenes.generate_scenes('test', 1000)):
    for caption in scenes.make_example('test', index, objects, 32)['captions']:
      assert caption not in all_captions, (caption, index, all_captions.get(caption))
      all_captions[caption] = index


def test_tfds_builder_builds_and_reads_the_tiny_config(data_dir):
  test = embedded_scenes.load_split(data_dir, 'test', 'tiny')
  assert test['image'].shape == (64, 32, 32, 3) and test['image'].dtype == np.uint8
  assert len(test['captions']) == 64 and all(len(c) == 5 for c in test['captions'])
  objects = scenes.generate_scenes('test', 64)
  expected = [scenes.make_example('test', i, o, 32) for i, o in enumerate(objects)]
  for i in range(64):
    np.testing.assert_array_equal(test['image'][i], expected[i]['image'])
    assert test['captions'][i] == expected[i]['captions']


def test_tokenizer_trains_saves_and_encodes(tmp_path):
  texts = ['a small red circle in the top left', 'a large blue square at the center'] * 10
  tok = tokenizer_lib.train_tokenizer(texts, str(tmp_path / 'vocab.txt'), vocab_size=100)
  reloaded = tokenizer_lib.Tokenizer(str(tmp_path / 'vocab.txt'))
  ids = reloaded.encode(texts[:2], max_len=12)
  assert ids.shape == (2, 12) and ids.dtype == np.int32
  assert ids[0, 0] == tok.special_ids['[CLS]'] and ids[0, 9] == tok.special_ids['[SEP]'] and ids[0, 10] == 0
  assert reloaded.decode(ids[0][1:9]) == texts[0]
  cut = reloaded.encode(texts[:1], max_len=5)
  assert cut[0, -1] == tok.special_ids['[SEP]']
  with pytest.raises(ValueError, match='Empty caption'):
    reloaded.encode(['fine', '  '], max_len=8)
  # The vocabulary is read through files.py: the same ids as the tokenizers library reading the file itself.
  direct = BertWordPieceTokenizer(str(tmp_path / 'vocab.txt'), lowercase=True)
  unseen = ['a huge purple wedge , lower right', 'ZEBRA!']
  assert [e.ids for e in direct.encode_batch(texts[:2] + unseen)] == [
      list(row[row != 0]) for row in reloaded.encode(texts[:2] + unseen, max_len=40)]


def test_train_order_is_a_function_of_the_step_and_covers_each_epoch():
  order = pipeline.TrainOrder(num_images=10, captions_per_image=5, global_batch=4, seed=3)
  first_epoch = np.concatenate([order.indices(s)[0] for s in range(2)] + [order.indices(2)[0][:2]])
  assert sorted(first_epoch) == list(range(10))
  fresh = pipeline.TrainOrder(10, 5, 4, seed=3)
  for step in (7, 2, 5):
    np.testing.assert_array_equal(order.indices(step)[0], fresh.indices(step)[0])
    np.testing.assert_array_equal(order.indices(step)[1], fresh.indices(step)[1])


def test_batches_that_straddle_an_epoch_never_hold_an_image_twice():
  num_images, batch, seed = 10, 4, 0
  order = pipeline.TrainOrder(num_images, 5, batch, seed)
  permutation = lambda epoch: np.random.default_rng([seed, epoch]).permutation(num_images)
  fixed = 0
  for step in range(60):  # 24 epochs; 2 of every 5 batches straddle two.
    images = order.indices(step)[0]
    assert len(set(images.tolist())) == batch, (step, images)
    epoch, offset = divmod(step * batch, num_images)
    tail = permutation(epoch)[offset:offset + batch]
    naive = np.concatenate([tail, permutation(epoch + 1)[:batch - len(tail)]])
    if len(set(naive.tolist())) == batch:
      np.testing.assert_array_equal(images, naive)  # Only batches that would repeat an image change.
    else:
      fixed += 1
      rest = [i for i in permutation(epoch + 1) if i not in tail]
      np.testing.assert_array_equal(images, np.concatenate([tail, rest[:batch - len(tail)]]))
  assert fixed >= 3
  with pytest.raises(ValueError, match='cannot hold 10 images once each'):
    pipeline.TrainOrder(num_images, 5, 12, seed)


def test_train_batches_never_hold_an_image_twice_and_repeat_from_any_step():
  num_images = 12  # Global batch 8: one batch in three straddles two epochs.
  data = pipeline.ImageTextSplit(images=np.arange(num_images, dtype=np.uint8).reshape(-1, 1, 1, 1),
                                 tokens=np.arange(num_images * 5, dtype=np.int32).reshape(num_images, 5, 1))
  batches = pipeline.train_batches(data, 8, seed=1, start_step=0)
  straight = [next(batches) for _ in range(30)]
  for batch in straight:
    images = batch['image'].reshape(-1)
    assert len(set(images.tolist())) == 8
    np.testing.assert_array_equal(batch['text'].reshape(-1) // 5, images)  # A caption of the same image.
  resumed = pipeline.train_batches(data, 8, seed=1, start_step=16)
  for expected in straight[16:]:
    np.testing.assert_array_equal(next(resumed)['image'], expected['image'])


def test_padded_batches_keep_every_row_once():
  array = np.arange(10)[:, None]
  rows = [batch[mask] for batch, mask in pipeline.padded_batches(array, 4)]
  assert [len(b) for b, _ in pipeline.padded_batches(array, 4)] == [4, 4, 4]
  np.testing.assert_array_equal(np.concatenate(rows), array)


def test_noisy_caption_option_replaces_exactly_the_recorded_fraction():
  rng = np.random.default_rng(0)
  tokens = rng.integers(5, 100, (50, 5, 8)).astype(np.int32)
  data = pipeline.ImageTextSplit(images=np.zeros((50, 4, 4, 3), np.uint8), tokens=tokens,
                                 captions=[[f'{i}-{c}' for c in range(5)] for i in range(50)])
  noisy = pipeline.with_replaced_captions(data, 0.2, seed=0)
  assert noisy.replaced.sum() == 10
  changed = np.any(noisy.tokens != tokens, axis=(1, 2))
  np.testing.assert_array_equal(changed, noisy.replaced)
  # Every replaced image got the full caption set of another image; clean ones are untouched.
  for i in np.flatnonzero(noisy.replaced):
    donor = int(noisy.captions[i][0].split('-')[0])
    assert donor != i and noisy.replaced[donor]
    np.testing.assert_array_equal(noisy.tokens[i], tokens[donor])
  assert pipeline.with_replaced_captions(data, 0.2, seed=0).replaced.tolist() == noisy.replaced.tolist()
  with pytest.raises(ValueError, match='noisy_caption_fraction=1.5'):
    pipeline.with_replaced_captions(data, 1.5, seed=0)
