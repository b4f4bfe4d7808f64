"""TFDS builder of Flickr30K with Karpathy's splits, read from a manual directory.

Flickr30K cannot be downloaded automatically (its images need a sign-up). Put the files in the manual dir:

  <manual_dir>/flickr30k-images/<id>.jpg      the 31,783 images
  <manual_dir>/dataset_flickr30k.json         Karpathy's split file

and build with `Flickr30k(data_dir=..., config='default').download_and_prepare(
download_config=tfds.download.DownloadConfig(manual_dir=<manual_dir>))`. Splits: train (29,000 images,
restval included), validation (1,014), test (1,000 images x 5 captions: the 1K-test protocol).
"""

import json
import os

import tensorflow_datasets as tfds

IMAGES_DIR = 'flickr30k-images'
SPLITS_FILE = 'dataset_flickr30k.json'
# Karpathy's split names -> ours; restval joins train, as is usual for retrieval.
KARPATHY_SPLITS = {'train': ('train', 'restval'), 'validation': ('val',), 'test': ('test',)}


def missing_files_message(manual_dir: str) -> str:
  return (f'Flickr30K needs manual files in {manual_dir!r}: the images folder {IMAGES_DIR!r} (from the '
          f'Flickr30K request form) and Karpathy\'s split file {SPLITS_FILE!r} (in his "caption_datasets.zip"). '
          'Download both, put them there, and build again.')


def read_karpathy_split(path: str, split: str) -> list[dict]:
  """The entries of one of our splits from a Karpathy JSON file: {'filename', 'captions': [str]}."""
  with open(path) as f:
    images = json.load(f)['images']
  entries = []
  for image in images:
    if image['split'] in KARPATHY_SPLITS[split]:
      captions = [s['raw'].strip() for s in image['sentences']]
      entries.append({'filename': image['filename'], 'captions': [c for c in captions if c]})
  return entries


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
    splits_file = os.path.join(manual_dir, SPLITS_FILE)
    if not (os.path.isdir(os.path.join(manual_dir, IMAGES_DIR)) and os.path.exists(splits_file)):
      raise FileNotFoundError(missing_files_message(manual_dir))
    return {split: self._generate_examples(manual_dir, split) for split in KARPATHY_SPLITS}

  def _generate_examples(self, manual_dir: str, split: str):
    for entry in read_karpathy_split(os.path.join(manual_dir, SPLITS_FILE), split):
      path = os.path.join(manual_dir, IMAGES_DIR, entry['filename'])
      if not os.path.exists(path):
        raise FileNotFoundError(f'{path} is listed in {SPLITS_FILE} but missing. ' +
                                missing_files_message(manual_dir))
      yield entry['filename'], {'image': path, 'image/filename': entry['filename'],
                                'captions': entry['captions']}
