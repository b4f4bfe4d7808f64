"""The hard embedded scenes: deterministic, disjoint splits, true captions, and the documented near-duplicates."""

import collections

import numpy as np
import tensorflow_datasets as tfds

from hivlp_jax.data import embedded_scenes
from hivlp_jax.data import hard_scenes
from hivlp_jax.data import scenes
from tests.test_data import assert_captions_describe
from tests.test_data import assert_objects_drawn

SPEC = hard_scenes.Spec()


def test_families_and_examples_are_deterministic():
  members = hard_scenes.generate_families('test', 40, SPEC)
  assert members == hard_scenes.generate_families('test', 40, SPEC)
  index = SPEC.family_size + 1  # The first edit of the second family.
  a, b = (hard_scenes.make_example('test', index, members[index], 32, SPEC) for _ in range(2))
  np.testing.assert_array_equal(a['image'], b['image'])
  assert a['captions'] == b['captions'] and a['family'] == b['family'] == 1


def test_splits_share_no_scene_and_no_bag_of_attributes():
  members = {split: hard_scenes.generate_families(split, n, SPEC)
             for split, n in (('train', 2000), ('validation', 240), ('test', 400))}
  keys = {split: [scenes.scene_key(m.objects) for m in split_members] for split, split_members in members.items()}
  bags = {split: {hard_scenes.bag_key(m.objects) for m in split_members} for split, split_members in members.items()}
  for split, split_keys in keys.items():
    assert len(set(split_keys)) == len(split_keys), split
  for a, b in (('train', 'test'), ('train', 'validation'), ('validation', 'test')):
    assert not set(keys[a]) & set(keys[b]), (a, b)
    assert not bags[a] & bags[b], (a, b)  # A swap keeps the bag: no scene's swap leaks into another split.
  # A default scene never lands in a hard split by its own seed: the hard splits are drawn apart.
  assert hard_scenes.SPLIT_SEEDS.keys() == scenes.SPLIT_SEEDS.keys()
  assert not set(hard_scenes.SPLIT_SEEDS.values()) & set(scenes.SPLIT_SEEDS.values())


def test_captions_name_every_object_and_the_pixels_show_them_despite_the_clutter():
  members = hard_scenes.generate_families('test', 160, SPEC)
  for index, member in enumerate(members):
    example = hard_scenes.make_example('test', index, member, 32, SPEC)
    assert_captions_describe(example['captions'], member.objects)
    for caption in example['captions']:  # A stated count is the true one.
      for number, word in hard_scenes.NUMBER_WORDS.items():
        if caption.startswith(f'{word} shapes') or caption.startswith(f'a picture of {word} shapes'):
          assert number == len(member.objects), caption
    assert_objects_drawn(example['image'], member.objects, index)
    grey = np.all(np.abs(example['image'].astype(int) - example['image'].mean(-1, keepdims=True)) < 3, -1)
    assert grey.sum() >= 3  # Clutter strokes are drawn (and no caption names them).


def test_every_test_family_is_a_base_and_single_edits_of_it_of_many_kinds():
  members = hard_scenes.generate_families('test', 1000, SPEC)
  families = collections.defaultdict(list)
  for member in members:
    families[member.family].append(member)
  assert len(families) == -(-1000 // SPEC.family_size)  # The last one cut short.
  kinds = collections.Counter()
  for index, family in families.items():
    base, *edits = family
    assert len(family) == min(SPEC.family_size, 1000 - index * SPEC.family_size) and base.edit == 'base'
    for member in edits:
      # Recomputed from the two scenes alone: exactly one edit, of the recorded kind.
      assert hard_scenes.difference(base.objects, member.objects) == member.edit != 'base', (base, member)
    kinds.update(m.edit for m in edits)
    assert len({m.edit for m in edits}) >= 2  # Each family mixes kinds of edit (3 to 7 kinds in most).
  assert set(kinds) == set(hard_scenes.EDIT_KINDS), kinds
  assert kinds['swap'] >= 100  # Pairs with the same bag of words and one relation flipped.


def test_difference_finds_one_edit_and_nothing_else():
  obj = scenes.SceneObject
  a = [obj('circle', 'red', 'small', 0), obj('square', 'blue', 'large', 4)]
  assert hard_scenes.difference(a, [a[0]._replace(colour='green'), a[1]]) == 'colour'
  assert hard_scenes.difference(a, [a[0]._replace(cell=8), a[1]]) == 'move'
  assert hard_scenes.difference(a, [a[0]._replace(cell=4), a[1]._replace(cell=0)]) == 'swap'
  assert hard_scenes.difference(a, a + [obj('cross', 'white', 'small', 2)]) == 'add'
  assert hard_scenes.difference(a, a[:1]) == 'remove'
  assert hard_scenes.difference(a, [a[0]._replace(colour='green', size='large'), a[1]]) is None  # Two edits.
  assert hard_scenes.difference(a, a) is None


def test_tfds_builder_writes_the_families(tmp_path):
  config = embedded_scenes.EmbeddedScenesConfig(name='hard_small', num_train=16, num_validation=16, num_test=24,
                                                hard=SPEC)
  builder = embedded_scenes.EmbeddedScenes(data_dir=str(tmp_path), config=config)
  builder.download_and_prepare()
  test = tfds.as_numpy(builder.as_dataset(split='test', batch_size=-1, shuffle_files=False))
  order = np.argsort(test['id'])  # TFDS stores examples in hashed-key order.
  members = hard_scenes.generate_families('test', 24, SPEC)
  assert len(order) == 24
  edit_names = ('base',) + hard_scenes.EDIT_KINDS
  for index, row in enumerate(order):
    expected = hard_scenes.make_example('test', index, members[index], 32, SPEC)
    np.testing.assert_array_equal(test['image'][row], expected['image'])
    assert [c.decode() for c in test['captions'][row]] == expected['captions']
    assert test['family'][row] == members[index].family == index // SPEC.family_size
    assert edit_names[test['edit'][row]] == members[index].edit
