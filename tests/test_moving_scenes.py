"""The embedded video data set: deterministic, disjoint splits, captions that the pixels bear out, reversed pairs."""

import collections
import hashlib
import pathlib
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from hivlp_jax.data import embedded_videos
from hivlp_jax.data import moving_scenes
from hivlp_jax.data import scenes

FRAMES = 8
# Words of the captions, read here independently of the generator's tables.
COLOUR_OF = {w: c for c, words in scenes.COLOUR_WORDS.items() for w in words}
SHAPE_OF = {w: s for s, words in scenes.SHAPE_WORDS.items() for w in words}
SIZE_OF = {w: s for s, words in scenes.SIZE_WORDS.items() for w in words}
UP, DOWN = {'up', 'upwards', 'upper', 'top'}, {'down', 'downwards', 'lower', 'bottom'}
LEFT, RIGHT = {'left', 'leftwards'}, {'right', 'rightwards'}
SLOW, FAST = {'slowly', 'gently'}, {'quickly', 'rapidly'}
GROW, SHRINK = {'grows', 'bigger', 'swells'}, {'shrinks', 'smaller'}
STILL = ('stays put', 'stays still', 'does not move', 'sits still', 'stays where it is')


@pytest.fixture(scope='module')
def video_dir(tmp_path_factory):
  """A data dir holding the 'tiny' embedded video data set."""
  path = str(tmp_path_factory.mktemp('videos'))
  embedded_videos.EmbeddedVideos(data_dir=path, config='tiny').download_and_prepare()
  return path


def parse_phrase(phrase: str) -> dict:
  """What one object's phrase says: its shape, colour and size at the start and end, its motion (dy, dx)."""
  words = phrase.split()
  colours = [COLOUR_OF[w] for w in words if w in COLOUR_OF]
  shapes, sizes = [SHAPE_OF[w] for w in words if w in SHAPE_OF], [SIZE_OF[w] for w in words if w in SIZE_OF]
  assert len(shapes) == 1 and len(sizes) == 1 and len(colours) in (1, 2), phrase
  word_set = set(words)
  dy = -1 if word_set & UP else 1 if word_set & DOWN else 0
  dx = -1 if word_set & LEFT else 1 if word_set & RIGHT else 0
  speed = 'slow' if word_set & SLOW else 'fast' if word_set & FAST else 'none'
  still = any(s in phrase for s in STILL)
  assert still == ((dy, dx) == (0, 0)) == (speed == 'none'), phrase  # A moving object has a direction and a speed.
  other_size = {'small': 'large', 'large': 'small'}[sizes[0]]
  end_size = other_size if word_set & (GROW if sizes[0] == 'small' else SHRINK) else sizes[0]
  assert not word_set & (SHRINK if sizes[0] == 'small' else GROW), phrase  # A small object cannot shrink.
  return {'shape': shapes[0], 'colour': colours[0], 'end_colour': colours[-1], 'size': sizes[0],
          'end_size': end_size, 'motion': (dy, dx), 'speed': speed}


def parse_caption(caption: str) -> list[dict]:
  for prefix in sorted(moving_scenes.CAPTION_PREFIXES, key=len, reverse=True):
    if caption.startswith(prefix):
      caption = caption[len(prefix):]
      break
  return [parse_phrase(p) for p in re.split(' while | as | ; ', caption)]


def find(frame: np.ndarray, colour: str) -> tuple[int, np.ndarray]:
  """The number of pixels of `frame` [S, S, 3] of the named colour, and their centroid (y, x)."""
  near = np.abs(frame.astype(int) - np.array(scenes.RGB[colour])).sum(-1) < 80
  ys, xs = np.nonzero(near)
  return len(ys), np.array([ys.mean(), xs.mean()]) + 0.5 if len(ys) else None


def area(shape: str, size: str, image_size: int = 32) -> int:
  yy, xx = np.mgrid[:image_size, :image_size] + 0.5 - image_size / 2
  return int(scenes.shape_mask(shape, scenes.radius(size, image_size), yy, xx).sum())


def assert_pixels_show(video: np.ndarray, said: dict, what) -> None:
  """The named colours are in the first and last frames of `video` [T, S, S, 3], where and as large as said."""
  count0, centre0 = find(video[0], said['colour'])
  count1, centre1 = find(video[-1], said['end_colour'])
  assert count0 >= 4 and count1 >= 4, (what, said, count0, count1)
  shift = centre1 - centre0
  for axis in range(2):  # The centroid moves the named way on each axis, and stays put on the other.
    if said['motion'][axis]:
      assert np.sign(shift[axis]) == said['motion'][axis] and abs(shift[axis]) > 2, (what, said, shift)
    else:
      assert abs(shift[axis]) < 1.5, (what, said, shift)
  if said['speed'] != 'none':  # 7 or 14 px over the clip.
    assert (np.hypot(*shift) > 10.5) == (said['speed'] == 'fast'), (what, said, shift)
  for count, size in ((count0, said['size']), (count1, said['end_size'])):  # Closer to the named size's area.
    other = {'small': 'large', 'large': 'small'}[size]
    assert abs(count - area(said['shape'], size)) < abs(count - area(said['shape'], other)), (what, said, count)


def said_by(obj: moving_scenes.MovingObject) -> dict:
  """What a caption should say of `obj`, from the generator's metadata."""
  return {'shape': obj.shape, 'colour': obj.colour, 'end_colour': obj.end_colour, 'size': obj.size,
          'end_size': obj.end_size, 'speed': obj.speed,
          'motion': moving_scenes.DIRECTIONS.get(obj.direction, (0, 0))}


def test_clips_and_examples_are_deterministic(tmp_path):
  clips = moving_scenes.generate_clips('test', 60)
  assert clips == moving_scenes.generate_clips('test', 60)
  assert moving_scenes.generate_clips('test', 30) == clips[:30]  # A shorter split is a prefix.
  reversed_index = next(i for i, c in enumerate(clips) if c.reverse_of >= 0)
  for index in (0, reversed_index):
    a, b = (moving_scenes.make_example('test', index, clips[index], FRAMES, 32) for _ in range(2))
    np.testing.assert_array_equal(a['video'], b['video'])
    assert a['captions'] == b['captions'] and a['reverse_of'] == b['reverse_of']
    for name, values in a['objects'].items():
      np.testing.assert_array_equal(values, b['objects'][name])


def test_two_builds_write_identical_bytes(video_dir, tmp_path):
  embedded_videos.EmbeddedVideos(data_dir=str(tmp_path), config='tiny').download_and_prepare()
  digest = lambda root: {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                         for p in sorted(pathlib.Path(root).rglob('*.tfrecord*'))}
  first, second = digest(video_dir), digest(tmp_path)
  assert len(first) == 3 and first == second


def test_splits_share_no_clip_and_a_split_no_description():
  clips = {split: moving_scenes.generate_clips(split, n) for split, n in (('train', 2000), ('validation', 300),
                                                                          ('test', 600))}
  keys = {split: [moving_scenes.clip_key(c.objects) for c in split_clips] for split, split_clips in clips.items()}
  for split, split_clips in clips.items():
    descriptions = [moving_scenes.description(c.objects) for c in split_clips]
    assert len(set(descriptions)) == len(descriptions), split  # A reversed clip is a description of its own.
    in_pairs = {i for r, c in enumerate(split_clips) if c.reverse_of >= 0 for i in (c.reverse_of, r)}
    counts = collections.Counter(keys[split])
    for index, key in enumerate(keys[split]):  # A key twice only for a clip and its reverse.
      assert counts[key] == 1 + (index in in_pairs), (split, index)
  # Same clip = same objects and motion (either way round), wherever it starts: no split shares one.
  for a, b in (('train', 'validation'), ('train', 'test'), ('validation', 'test')):
    assert not set(keys[a]) & set(keys[b]), (a, b)


def test_tiny_splits_share_no_video(video_dir):
  hashes = {}
  for split in ('train', 'validation', 'test'):
    for i, video in enumerate(embedded_videos.load_split(video_dir, split, 'tiny')['video']):
      for frames in (video, video[::-1]):  # Nor a clip played backwards.
        digest = hashlib.sha256(frames.tobytes()).hexdigest()
        assert hashes.setdefault(digest, (split, i)) in ((split, i), (split, i - 1), (split, i + 1)), (split, i)


def test_every_caption_describes_its_clip_and_the_pixels_show_it(video_dir):
  test = embedded_videos.load_split(video_dir, 'test', 'tiny')
  clips = moving_scenes.generate_clips('test', 100)
  train_clips = moving_scenes.generate_clips('train', 100)  # More clips, rendered here.
  examples = [(v, c, clip) for v, c, clip in zip(test['video'], test['captions'], clips)] + [
      (e['video'], e['captions'], clip) for e, clip in
      ((moving_scenes.make_example('train', i, clip, FRAMES, 32), clip) for i, clip in enumerate(train_clips))]
  changes = {'grow': 0, 'shrink': 0, 'colour': 0}
  for index, (video, captions, clip) in enumerate(examples):
    assert len(captions) == scenes.NUM_CAPTIONS == len(set(captions)), index
    expected = sorted(tuple(sorted(said_by(o).items())) for o in clip.objects)
    for caption in captions:
      said = parse_caption(caption)
      assert sorted(tuple(sorted(s.items())) for s in said) == expected, (index, caption)  # Every object, and only what it does.
      for phrase in said:
        assert_pixels_show(video, phrase, (index, caption))
    for obj in clip.objects:
      changes['grow'] += obj.size == 'small' != obj.end_size
      changes['shrink'] += obj.size == 'large' != obj.end_size
      changes['colour'] += obj.colour != obj.end_colour
  assert min(changes.values()) >= 5, changes  # Every kind of change was checked.
  directions = {o.direction for _, _, clip in examples for o in clip.objects}
  assert directions == set(moving_scenes.MOTION_DIRECTIONS)


def test_reversed_pairs_are_the_forward_frames_backwards_with_opposite_captions(video_dir):
  test = embedded_videos.load_split(video_dir, 'test', 'tiny')
  reverse_of = test['reverse_of']
  pairs = [(int(f), r) for r, f in enumerate(reverse_of) if f >= 0]
  assert len(pairs) >= 20  # About 1/3 of the clips reverse the one before.
  for forward, backward in pairs:
    assert forward == backward - 1 and reverse_of[forward] == -1
    np.testing.assert_array_equal(test['video'][backward], test['video'][forward][::-1])
    assert not np.array_equal(test['video'][backward], test['video'][forward])
    for caption_f in test['captions'][forward]:
      by_end_colour = {s['end_colour']: s for s in parse_caption(caption_f)}
      for caption_b in test['captions'][backward]:
        for said in parse_caption(caption_b):  # The same object: it starts with the colour the other ends with.
          other = by_end_colour[said['colour']]
          assert said['motion'] == tuple(-v for v in other['motion']) and said['speed'] == other['speed']
          assert (said['size'], said['end_size'], said['end_colour']) == (other['end_size'], other['size'],
                                                                          other['colour'])


def test_builder_writes_what_the_generator_makes_and_the_loader_reads_it(video_dir):
  test = embedded_videos.load_split(video_dir, 'test', 'tiny')
  assert test['video'].shape == (100, FRAMES, 32, 32, 3) and test['video'].dtype == np.uint8
  assert len(test['captions']) == 100 and test['reverse_of'].shape == (100,)
  clips = moving_scenes.generate_clips('test', 100)
  for index in range(100):
    expected = moving_scenes.make_example('test', index, clips[index], FRAMES, 32)
    np.testing.assert_array_equal(test['video'][index], expected['video'])
    assert test['captions'][index] == expected['captions'] and test['reverse_of'][index] == clips[index].reverse_of
  builder = embedded_videos.EmbeddedVideos(data_dir=video_dir, config='tiny')
  rows = tfds.as_numpy(builder.as_dataset(split='test', batch_size=-1, shuffle_files=False))
  row = int(np.flatnonzero(rows['id'] == 5)[0])
  objects = rows['objects']
  for i, obj in enumerate(clips[5].objects):  # The metadata: class names and pixel centres.
    assert moving_scenes.MOTION_DIRECTIONS[objects['direction'][row][i]] == obj.direction
    assert scenes.COLOURS[objects['end_colour'][row][i]] == obj.end_colour
    np.testing.assert_allclose(objects['start'][row][i], np.array(obj.start) * 32, rtol=1e-6)
  for split in ('train', 'validation', 'test'):
    assert builder.info.splits[split].num_examples == embedded_videos.num_examples('tiny', split)
  with pytest.raises(Exception, match="Unknown embedded_videos config 'huge'"):
    embedded_videos.num_examples('huge', 'test')


def test_statistics_table_counts_the_tiny_config():
  """The command docs/data.md's table comes from still runs, and its counts add up."""
  table = embedded_videos.statistics('tiny')
  test_row = next(line for line in table.splitlines() if line.startswith('| test | 100 |'))
  cells = [c.strip() for c in test_row.strip('|').split('|')]
  clips = moving_scenes.generate_clips('test', 100)
  assert cells[2].startswith(f'{2 * sum(c.reverse_of >= 0 for c in clips)} (')
  assert sum(int(n) for n in cells[3].split(' / ')) == 100 and cells[6] == '500'
