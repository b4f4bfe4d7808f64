"""Karpathy's caption split files (`dataset_flickr30k.json`, `dataset_coco.json`) and their image folders.

Both files come from Karpathy's "caption_datasets.zip" and list {'filename', 'split', 'sentences': [{'raw'}]}
per image; COCO entries also name their folder in 'filepath' (train2014 or val2014). One layout per data set
says where the files are in a manual directory, so the Flickr30K builder, the COCO reader and the streaming
pipeline share one reader and one missing-files message.
"""

import dataclasses
import json

from absl import logging

from hivlp_jax import errors
from hivlp_jax import files

# Karpathy's split names -> ours; restval joins train, as is usual for retrieval.
KARPATHY_SPLITS = {'train': ('train', 'restval'), 'validation': ('val',), 'test': ('test',)}
SPLITS_DOWNLOAD = 'https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip'


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a data set's files sit in its manual directory.

  images_dirs: folders (relative to the manual dir) that must exist. An entry's image is at
    <manual_dir>/<images_dirs[0]>/<filename> when `per_entry_folder` is False, else at
    <manual_dir>/<entry 'filepath'>/<filename>.
  """
  name: str
  splits_file: str
  images_dirs: tuple[str, ...]
  images_source: str  # Where to get the images, for the missing-files message.
  per_entry_folder: bool = False

  def missing_files_message(self, manual_dir: str) -> str:
    folders = ', '.join(repr(d) for d in self.images_dirs)
    return (f'{self.name} needs manual files in {manual_dir!r}: the image folder(s) {folders} (from '
            f'{self.images_source}) and Karpathy\'s split file {self.splits_file!r} (in his "caption_datasets.zip", '
            f'{SPLITS_DOWNLOAD}). Download them, put them there, and run again.')

  def check(self, manual_dir: str) -> None:
    """Raises FileNotFoundError, saying what to download and where to put it, when a file is missing."""
    root = files.path(manual_dir)
    if not (all((root / d).is_dir() for d in self.images_dirs) and (root / self.splits_file).exists()):
      raise errors.MissingInputError(self.missing_files_message(manual_dir))


FLICKR30K = Layout(name='Flickr30K', splits_file='dataset_flickr30k.json', images_dirs=('flickr30k-images',),
                   images_source='the Flickr30K request form, https://shannon.cs.illinois.edu/DenotationGraph/')
COCO = Layout(name='COCO', splits_file='dataset_coco.json', images_dirs=('train2014', 'val2014'),
              images_source='http://images.cocodataset.org/zips/train2014.zip and val2014.zip',
              per_entry_folder=True)
LAYOUTS = {'flickr30k': FLICKR30K, 'coco': COCO}


# The keys every entry of a split file needs (COCO's also 'filepath', its image folder).
ENTRY_KEYS = ('filename', 'split', 'sentences')


def _entries(path: str, keys: tuple[str, ...] = ENTRY_KEYS) -> list[dict]:
  """The 'images' list of a split file, each entry checked: ValueError naming the file, entry and key."""
  try:
    data = files.read_json(path)
  except json.JSONDecodeError as e:
    raise errors.InputError(f'{path} is not valid JSON ({e}); is it one of Karpathy\'s split files?') from e
  if not isinstance(data, dict) or not isinstance(data.get('images'), list):
    raise errors.InputError(f"{path} has no 'images' list: it is not one of Karpathy's split files "
                            f'({SPLITS_DOWNLOAD}).')
  for index, image in enumerate(data['images']):
    if not isinstance(image, dict):
      raise errors.InputError(f'{path}: images[{index}] is a {type(image).__name__}, not an object.')
    missing = [k for k in keys if k not in image or (k != 'sentences' and not image[k])]
    if missing:
      raise errors.InputError(f'{path}: images[{index}] has no {missing[0]!r} (every entry needs {list(keys)}).')
    if not isinstance(image['sentences'], list):
      raise errors.InputError(f"{path}: images[{index}]['sentences'] is not a list.")
    for j, sentence in enumerate(image['sentences']):
      if not isinstance(sentence, dict) or not isinstance(sentence.get('raw'), str):
        raise errors.InputError(f"{path}: images[{index}]['sentences'][{j}] has no 'raw' caption text.")
  return data['images']


def read_split(path: str, split: str, needs_filepath: bool = False) -> list[dict]:
  """Entries of one of our splits in a Karpathy JSON file, in file order.

  Returns [{'filename', 'filepath' ('' when the file has none), 'captions': [str]}]. A malformed file or
  entry is a ValueError that names the file, the entry index and the key. Empty captions are dropped, with
  a warning that counts them; an image left without any is still listed, with no captions (training skips
  it and counts it as 'empty_captions'; evaluation refuses it as having too few captions).
  """
  if split not in KARPATHY_SPLITS:
    raise errors.InputError(f'Unknown split {split!r}; Karpathy splits map to {sorted(KARPATHY_SPLITS)}.')
  entries, empty, first_empty = [], 0, []
  keys = ENTRY_KEYS + (('filepath',) if needs_filepath else ())
  for index, image in enumerate(_entries(path, keys)):
    if image['split'] in KARPATHY_SPLITS[split]:
      captions = [s['raw'].strip() for s in image['sentences']]
      if not all(captions):
        empty += captions.count('')
        first_empty.append(index)
      entries.append({'filename': image['filename'], 'filepath': image.get('filepath', ''),
                      'captions': [c for c in captions if c]})
  if empty:
    logging.warning('%s: dropped %d empty captions of the %s split (images%s); an image left with none is '
                    'skipped in training and refused in evaluation.', path, empty, split, first_empty[:5])
  return entries


def image_path(manual_dir: str, layout: Layout, entry: dict) -> str:
  folder = entry['filepath'] if layout.per_entry_folder else layout.images_dirs[0]
  return str(files.path(manual_dir) / folder / entry['filename'])


def read_manual_split(manual_dir: str, layout: Layout, split: str) -> list[dict]:
  """`read_split` of the layout's split file, with each entry's image 'path'; checks the files first."""
  layout.check(manual_dir)
  entries = read_split(str(files.path(manual_dir) / layout.splits_file), split, layout.per_entry_folder)
  for entry in entries:
    entry['path'] = image_path(manual_dir, layout, entry)
  return entries
