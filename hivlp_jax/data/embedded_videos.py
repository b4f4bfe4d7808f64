"""TFDS builder of the embedded video data set (procedural clips of moving shapes, 5 captions per clip).

Generated locally from `moving_scenes.py`, no download:

  builder = EmbeddedVideos(data_dir='data')  # Config 'default'; 'tiny' for tests.
  builder.download_and_prepare()
  test = load_split('data', 'test')  # Or builder.as_dataset(split='test').
"""

import collections
import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from hivlp_jax.data import embedded_scenes
from hivlp_jax.data import moving_scenes
from hivlp_jax.data import scenes


@dataclasses.dataclass
class EmbeddedVideosConfig(tfds.core.BuilderConfig):
  image_size: int = 32
  num_frames: int = 8
  num_train: int = 20_000
  num_validation: int = 1_000
  num_test: int = 2_000  # About 2/3 of them in forward/reversed pairs (moving_scenes.REVERSE_PROB).


class EmbeddedVideos(tfds.core.GeneratorBasedBuilder):
  """Clips of 1-2 coloured shapes moving in straight lines, each with 5 paraphrased captions of the motion."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = [
      EmbeddedVideosConfig(name='default', description='8 frames of 32x32; 20k train, 1k val, 2k test clips.'),
      EmbeddedVideosConfig(name='tiny', description='For tests: 8 frames of 32x32; 200 train, 50 val, 100 test.',
                           num_train=200, num_validation=50, num_test=100),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    size = config.image_size
    class_label = lambda names: tfds.features.ClassLabel(names=list(names))
    point = tfds.features.Tensor(shape=(2,), dtype=np.float32)  # (y, x) in pixels.
    features = {
        'id': tfds.features.Scalar(np.int64),  # Clip index within its split.
        # Raw frames, zlib-compressed: the still background repeats in every frame, so zlib's matches across
        # frames keep a clip small, where per-frame PNGs could not share anything.
        'video': tfds.features.Tensor(shape=(config.num_frames, size, size, 3), dtype=np.uint8,
                                      encoding=tfds.features.Encoding.ZLIB),
        'captions': tfds.features.Sequence(tfds.features.Text(), length=scenes.NUM_CAPTIONS),
        'objects': tfds.features.Sequence({
            'shape': class_label(scenes.SHAPES),
            'colour': class_label(scenes.COLOURS),  # At the first frame.
            'size': class_label(scenes.SIZES),
            'end_colour': class_label(scenes.COLOURS),  # At the last frame.
            'end_size': class_label(scenes.SIZES),
            'direction': class_label(moving_scenes.MOTION_DIRECTIONS),  # 'none': stays put.
            'speed': class_label(moving_scenes.MOTION_SPEEDS),
            'start': point,  # The centre at the first frame.
            'end': point,  # At the last frame.
        }),
        'reverse_of': tfds.features.Scalar(np.int64),  # The id of the clip this one plays backwards; -1: none.
    }
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(features),
        supervised_keys=None,
        homepage='https://github.com/hivlp-jax/hivlp_jax',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    return {
        'train': self._generate_examples('train', config.num_train),
        'validation': self._generate_examples('validation', config.num_validation),
        'test': self._generate_examples('test', config.num_test),
    }

  def _generate_examples(self, split: str, num_examples: int):
    config = self.builder_config
    for index, clip in enumerate(moving_scenes.generate_clips(split, num_examples)):
      example = moving_scenes.make_example(split, index, clip, config.num_frames, config.image_size)
      yield index, {'id': index, **example}


def load_split(data_dir: str, split: str, config_name: str = 'default') -> dict[str, np.ndarray]:
  """Builds the data set if missing and reads one split into memory.

  Returns, in clip order:
    'video': uint8 [N, T, H, W, 3]; 'captions': list of N lists of 5 str (decoded);
    'reverse_of': int64 [N], the index of the clip a clip plays backwards, -1 for none.
  """
  return embedded_scenes.read_in_order(EmbeddedVideos(data_dir=data_dir, config=config_name), split,
                                      ('video', 'reverse_of'))


def num_examples(config_name: str, split: str) -> int:
  """The number of clips of a split of a builder config, without building it."""
  return embedded_scenes.split_size(EmbeddedVideos, config_name, split)


def statistics(config_name: str = 'default') -> str:
  """Markdown tables of each split of a builder config: clips, objects, motions, changes, captions.

  Counted from the generator (the clips' descriptions and captions; nothing is rendered or built).
  """
  splits = ('train', 'validation', 'test')
  rows, motion_rows = [], []
  for split in splits:
    clips = moving_scenes.generate_clips(split, num_examples(config_name, split))
    objects = [o for clip in clips for o in clip.objects]
    moving = [o for o in objects if o.direction != moving_scenes.STILL]
    count = lambda values: collections.Counter(values)
    num_objects = count(len(c.objects) for c in clips)
    num_moving = count(sum(o.direction != moving_scenes.STILL for o in c.objects) for c in clips)
    changes = count('colour' if o.colour != o.end_colour else 'none' if o.size == o.end_size
                    else 'grow' if o.size == 'small' else 'shrink' for o in objects)
    captions = [c for i, clip in enumerate(clips) for c in moving_scenes.captions_of(split, i, clip)]
    words = [len(c.split()) for c in captions]
    in_pairs = 2 * sum(c.reverse_of >= 0 for c in clips)
    rows.append(f'| {split} | {len(clips):,} | {in_pairs:,} ({in_pairs / len(clips):.0%}) | '
                f'{num_objects[1]:,} / {num_objects[2]:,} | {num_moving[1]:,} / {num_moving[2]:,} | '
                + ' / '.join(f'{changes[k]:,}' for k in ('none', 'grow', 'shrink', 'colour')) +
                f' | {len(set(captions)):,} | {np.mean(words):.1f} / {max(words)} |')
    directions, speeds = count(o.direction for o in moving), count(o.speed for o in moving)
    motion_rows.append(f'| {split} | {len(moving):,} | '
                       + ' / '.join(f'{directions[d]:,}' for d in moving_scenes.DIRECTIONS) + ' | '
                       + ' / '.join(f'{speeds[s]:,}' for s in moving_scenes.SPEEDS) + ' |')
  return '\n'.join([
      '| split | clips | in reversed pairs | objects per clip (1 / 2) | moving objects per clip (1 / 2) | '
      'objects that change (none / grow / shrink / colour) | unique captions | words per caption (mean / max) |',
      '|---|---|---|---|---|---|---|---|', *rows, '',
      '| split | moving objects | direction (' + ' / '.join(moving_scenes.DIRECTIONS) + ') | speed (slow / fast) |',
      '|---|---|---|---|', *motion_rows])
