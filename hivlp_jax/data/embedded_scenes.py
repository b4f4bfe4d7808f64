"""TFDS builder of the embedded default data set (procedural scenes, 5 captions per image).

Generated locally from `scenes.py`, no download:

  builder = EmbeddedScenes(data_dir='data')
  builder.download_and_prepare()
  test = builder.as_data_source(split='test')
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from hivlp_jax import errors
from hivlp_jax.data import scenes


@dataclasses.dataclass
class EmbeddedScenesConfig(tfds.core.BuilderConfig):
  image_size: int = 32
  num_train: int = 40_000
  num_validation: int = 1_000
  num_test: int = 1_000  # The Flickr30K 1K-test protocol: 1,000 images x 5 captions.


class EmbeddedScenes(tfds.core.GeneratorBasedBuilder):
  """Scenes of 1 to 3 coloured shapes on a 3x3 grid, each with 5 paraphrased captions."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = [
      EmbeddedScenesConfig(name='default', description='32x32 images; 40k train, 1k val, 1k test.'),
      EmbeddedScenesConfig(name='tiny', description='For tests: 32x32 images; 512 train, 64 val, 64 test.',
                           num_train=512, num_validation=64, num_test=64),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    class_label = lambda names: tfds.features.ClassLabel(names=list(names))
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'id': tfds.features.Scalar(np.int64),  # Scene index within its split.
            'image': tfds.features.Image(shape=(size, size, 3)),
            'captions': tfds.features.Sequence(tfds.features.Text(), length=scenes.NUM_CAPTIONS),
            'objects': tfds.features.Sequence({
                'shape': class_label(scenes.SHAPES),
                'colour': class_label(scenes.COLOURS),
                'size': class_label(scenes.SIZES),
                'cell': class_label(c.replace(' ', '_') for c in scenes.CELLS),
            }),
        }),
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
    for index, objects in enumerate(scenes.generate_scenes(split, num_examples)):
      example = scenes.make_example(split, index, objects, self.builder_config.image_size)
      yield index, {'id': index, **example}


def load_split(data_dir: str, split: str, config_name: str = 'default') -> dict[str, np.ndarray]:
  """Builds the data set if missing and reads one split into memory.

  Returns, in scene order:
    'image': uint8 [N, H, W, 3]; 'captions': list of N lists of 5 str (decoded).
  """
  builder = EmbeddedScenes(data_dir=data_dir, config=config_name)
  builder.download_and_prepare()
  data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
  order = np.argsort(data['id'])  # TFDS stores examples in hashed-key order.
  return {
      'image': data['image'][order],
      'captions': [[c.decode('utf-8') for c in data['captions'][i]] for i in order],
  }


def num_examples(config_name: str, split: str) -> int:
  """The number of images of a split of a builder config, without building it."""
  configs = {c.name: c for c in EmbeddedScenes.BUILDER_CONFIGS}
  if config_name not in configs:
    raise errors.InputError(f'Unknown embedded_scenes config {config_name!r}; known: {sorted(configs)}.')
  sizes = {'train': configs[config_name].num_train, 'validation': configs[config_name].num_validation,
           'test': configs[config_name].num_test}
  if split not in sizes:
    raise errors.InputError(f'Unknown split {split!r} of embedded_scenes; known: {sorted(sizes)}.')
  return sizes[split]
