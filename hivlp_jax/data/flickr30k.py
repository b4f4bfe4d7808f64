"""TFDS builder of Flickr30K with Karpathy's splits, read from a manual directory.

Flickr30K cannot be downloaded automatically (its images need a sign-up). Put the files in the manual dir:

  <manual_dir>/flickr30k-images/<id>.jpg      the 31,783 images
  <manual_dir>/dataset_flickr30k.json         Karpathy's split file

and build with `Flickr30k(data_dir=..., config='default').download_and_prepare(
download_config=tfds.download.DownloadConfig(manual_dir=<manual_dir>))`. Splits: train (29,000 images,
restval included), validation (1,014), test (1,000 images x 5 captions: the 1K-test protocol).
The streaming pipeline (streaming.py) can also read the manual dir directly, without building.
"""

import os

import tensorflow_datasets as tfds

from hivlp_jax import errors
from hivlp_jax import files
from hivlp_jax.data import karpathy

LAYOUT = karpathy.FLICKR30K
IMAGES_DIR, = LAYOUT.images_dirs
SPLITS_FILE = LAYOUT.splits_file
KARPATHY_SPLITS = karpathy.KARPATHY_SPLITS
missing_files_message = LAYOUT.missing_files_message


def read_karpathy_split(path: str, split: str) -> list[dict]:
  """The entries of one of our splits from a Karpathy JSON file: {'filename', 'captions': [str], ...}."""
  return karpathy.read_split(path, split)


class Flickr30k(tfds.core.GeneratorBasedBuilder):
  """Flickr30K images with their 5 captions, Karpathy splits."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = missing_files_message('<manual_dir>')

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(encoding_format='jpeg'),
            'image/filename': tfds.features.Text(),
            'captions': tfds.features.Sequence(tfds.features.Text()),
        }),
        homepage='https://shannon.cs.illinois.edu/DenotationGraph/',
    )

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    LAYOUT.check(manual_dir)
    return {split: self._generate_examples(manual_dir, split) for split in KARPATHY_SPLITS}

  def _generate_examples(self, manual_dir: str, split: str):
    for entry in karpathy.read_manual_split(manual_dir, LAYOUT, split):
      if not files.path(entry['path']).exists():
        raise errors.MissingInputError(f'{entry["path"]} is listed in {SPLITS_FILE} but missing. ' +
                                       missing_files_message(manual_dir))
      yield entry['filename'], {'image': entry['path'], 'image/filename': entry['filename'],
                                'captions': entry['captions']}
