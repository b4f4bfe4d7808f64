"""Karpathy's caption split files (`dataset_flickr30k.json`, `dataset_coco.json`) and their image folders.

Both files come from Karpathy's "caption_datasets.zip" and list {'filename', 'split', 'sentences': [{'raw'}]}
per image; COCO entries also name their folder in 'filepath' (train2014 or val2014). One layout per data set
says where the files are in a manual directory, so the Flickr30K builder, the COCO reader and the streaming
pipeline share one reader and one missing-files message.
"""

import dataclasses
import json
import os

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
    needed = [os.path.join(manual_dir, d) for d in self.images_dirs]
    if not (all(os.path.isdir(d) for d in needed) and os.path.exists(os.path.join(manual_dir, self.splits_file))):
      raise FileNotFoundError(self.missing_files_message(manual_dir))


FLICKR30K = Layout(name='Flickr30K', splits_file='dataset_flickr30k.json', images_dirs=('flickr30k-images',),
                   images_source='the Flickr30K request form, https://shannon.cs.illinois.edu/DenotationGraph/')
COCO = Layout(name='COCO', splits_file='dataset_coco.json', images_dirs=('train2014', 'val2014'),
              images_source='http://images.cocodataset.org/zips/train2014.zip and val2014.zip',
              per_entry_folder=True)
LAYOUTS = {'flickr30k': FLICKR30K, 'coco': COCO}


def read_split(path: str, split: str) -> list[dict]:
  """Entries of one of our splits in a Karpathy JSON file, in file order.

  Returns [{'filename', 'filepath' ('' when the file has none), 'captions': [str]}]; empty captions are dropped.
  """
  if split not in KARPATHY_SPLITS:
    raise ValueError(f'Unknown split {split!r}; Karpathy splits map to {sorted(KARPATHY_SPLITS)}.')
  with open(path) as f:
    images = json.load(f)['images']
  entries = []
  for image in images:
    if image['split'] in KARPATHY_SPLITS[split]:
      captions = [s['raw'].strip() for s in image['sentences']]
      entries.append({'filename': image['filename'], 'filepath': image.get('filepath', ''),
                      'captions': [c for c in captions if c]})
  return entries


def image_path(manual_dir: str, layout: Layout, entry: dict) -> str:
  folder = entry['filepath'] if layout.per_entry_folder else layout.images_dirs[0]
  return os.path.join(manual_dir, folder, entry['filename'])


def read_manual_split(manual_dir: str, layout: Layout, split: str) -> list[dict]:
  """`read_split` of the layout's split file, with each entry's image 'path'; checks the files first."""
  layout.check(manual_dir)
  entries = read_split(os.path.join(manual_dir, layout.splits_file), split)
  for entry in entries:
    entry['path'] = image_path(manual_dir, layout, entry)
  return entries
