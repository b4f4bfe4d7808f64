"""TFDS builder of the embedded data sets (procedural scenes, 5 captions per image).

Generated locally from `scenes.py` (configs 'default', 'tiny') and `hard_scenes.py` ('hard': families of
near-duplicate scenes), no download:

  builder = EmbeddedScenes(data_dir='data')
  builder.download_and_prepare()
  test = load_split('data', 'test', 'hard')  # Or builder.as_dataset(split='test').
"""

import dataclasses
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds

from hivlp_jax import errors
from hivlp_jax.data import hard_scenes
from hivlp_jax.data import scenes


@dataclasses.dataclass
class EmbeddedScenesConfig(tfds.core.BuilderConfig):
  image_size: int = 32
  num_train: int = 40_000
  num_validation: int = 1_000
  num_test: int = 1_000  # The Flickr30K 1K-test protocol: 1,000 images x 5 captions.
  hard: Optional[hard_scenes.Spec] = None  # Set: the hard scenes' families (hard_scenes.py); None: scenes.py.


class EmbeddedScenes(tfds.core.GeneratorBasedBuilder):
  """Scenes of coloured shapes on a 3x3 grid, each with 5 paraphrased captions."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = [
      EmbeddedScenesConfig(name='default', description='32x32 images; 40k train, 1k val, 1k test.'),
      EmbeddedScenesConfig(name='tiny', description='For tests: 32x32 images; 512 train, 64 val, 64 test.',
                           num_train=512, num_validation=64, num_test=64),
      EmbeddedScenesConfig(name='hard', description='32x32 images of 2 to 5 objects and clutter, in families '
                           'of 16 single-edit near-duplicates; 40k train, 1k val, 1k test.', hard=hard_scenes.Spec()),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    class_label = lambda names: tfds.features.ClassLabel(names=list(names))
    features = {
        'id': tfds.features.Scalar(np.int64),  # Scene index within its split.
        'image': tfds.features.Image(shape=(size, size, 3)),
        'captions': tfds.features.Sequence(tfds.features.Text(), length=scenes.NUM_CAPTIONS),
        'objects': tfds.features.Sequence({
            'shape': class_label(scenes.SHAPES),
            'colour': class_label(scenes.COLOURS),
            'size': class_label(scenes.SIZES),
            'cell': class_label(c.replace(' ', '_') for c in scenes.CELLS),
        }),
    }
    if self.builder_config.hard:  # Which family a scene is in, and the edit that made it from the base.
      features['family'] = tfds.features.Scalar(np.int64)
      features['edit'] = class_label(('base',) + hard_scenes.EDIT_KINDS)
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
    if config.hard:
      for index, member in enumerate(hard_scenes.generate_families(split, num_examples, config.hard)):
        yield index, {'id': index, **hard_scenes.make_example(split, index, member, config.image_size, config.hard)}
      return
    for index, objects in enumerate(scenes.generate_scenes(split, num_examples)):
      example = scenes.make_example(split, index, objects, config.image_size)
      yield index, {'id': index, **example}


def load_split(data_dir: str, split: str, config_name: str = 'default') -> dict[str, np.ndarray]:
  """Builds the data set if missing and reads one split into memory.

  Returns, in scene order:
    'image': uint8 [N, H, W, 3]; 'captions': list of N lists of 5 str (decoded).
  """
  return read_in_order(EmbeddedScenes(data_dir=data_dir, config=config_name), split, ('image',))


def read_in_order(builder: tfds.core.DatasetBuilder, split: str, arrays: tuple[str, ...]) -> dict:
  """Prepares `builder` if needed and reads a whole split in 'id' order (TFDS stores examples in hashed-key
  order): the features named in `arrays` as numpy arrays, and 'captions' as lists of str. Shared by the
  embedded builders."""
  builder.download_and_prepare()
  data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
  order = np.argsort(data['id'])
  ordered = {k: data[k][order] for k in arrays}
  ordered['captions'] = [[c.decode('utf-8') for c in data['captions'][i]] for i in order]
  return ordered


def num_examples(config_name: str, split: str) -> int:
  """The number of images of a split of a builder config, without building it."""
  return split_size(EmbeddedScenes, config_name, split)


def split_size(builder_class, config_name: str, split: str) -> int:
  """The examples of a split of one of `builder_class`'s configs (num_train / num_validation / num_test)."""
  configs = {c.name: c for c in builder_class.BUILDER_CONFIGS}
  if config_name not in configs:
    raise errors.InputError(f'Unknown {builder_class.name} config {config_name!r}; known: {sorted(configs)}.')
  config = configs[config_name]
  sizes = {'train': config.num_train, 'validation': config.num_validation, 'test': config.num_test}
  if split not in sizes:
    raise errors.InputError(f'Unknown split {split!r} of {builder_class.name}; known: {sorted(sizes)}.')
  return sizes[split]
