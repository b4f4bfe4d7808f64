"""Sources of real image-caption data: web shards, Flickr30K, COCO and MSR-VTT, as random-access sequences of
undecoded examples, which grain reads in any order (data/streaming.py).

Flickr30K and COCO come as Karpathy's JSON + image folders or as a TFDS build in the ArrayRecord format; web
shards as ArrayRecord files converted from img2dataset tars (`python -m hivlp_jax.data.convert_shards`);
MSR-VTT as a folder of videos. Unusable examples stay in the sequence, marked with the `webdataset.ReadStats`
field that counts them, so that indices do not depend on decoding; `SkipLog` names them in the log.
"""

import dataclasses
import hashlib
import itertools
from typing import Iterator, Optional, Sequence

from absl import logging
import ml_collections
import numpy as np

from hivlp_jax import errors
from hivlp_jax import files
from hivlp_jax.data import karpathy
from hivlp_jax.data import msrvtt
from hivlp_jax.data import raw_examples
from hivlp_jax.data import records
from hivlp_jax.data import webdataset

TFDS_NAMES = {'coco': 'coco_captions/2014', 'flickr30k': 'flickr30k'}
# Our split names -> TFDS split names, per data set (coco_captions keeps Karpathy's names).
TFDS_SPLITS = {'coco': {'train': ('train', 'restval'), 'validation': ('val',), 'test': ('test',)},
               'flickr30k': {'train': ('train',), 'validation': ('validation',), 'test': ('test',)}}


RawExample = raw_examples.RawExample  # Every reader here builds them.


@dataclasses.dataclass(frozen=True)
class Source:
  """A data set as a random-access sequence of undecoded examples (`len`, `examples[i]`; it pickles, for
  grain's worker processes).

  files: the files that hold the examples when they are not one file per example (ArrayRecord, TFDS):
  `fingerprint` reads their names and sizes instead of every caption.
  """
  name: str
  examples: Sequence[RawExample]
  files: Sequence[str] = ()


def read_image_file(path: str) -> tuple[Optional[bytes], str]:
  """(the bytes of an image file, '') or (None, the `ReadStats` field of why not)."""
  try:
    return files.path(path).read_bytes(), ''
  except FileNotFoundError:
    return None, 'missing_parts'
  except OSError:
    return None, 'corrupt_images'


class SkipLog:
  """Names skipped examples in the log: every damaged shard, and the first `limit` other examples.

  After those, only the counts (`webdataset.ReadStats`) say what is skipped. `take` decides, `log` writes:
  a stream decides as it reads ahead, and logs as its batches are consumed.
  """

  def __init__(self, what: str, limit: int = 10):
    self.what, self.limit = what, limit
    self._taken = self._logged = 0

  def take(self, problem: str) -> bool:
    """Whether to name a skipped example of `problem` (counting it as named)."""
    if problem == 'corrupt_shards':
      return True
    self._taken += 1
    return self._taken <= self.limit

  def log(self, problem: str, description: str) -> None:
    if problem == 'corrupt_shards':
      logging.warning('%s: skipped the rest of a truncated or corrupt shard, %s.', self.what, description)
      return
    self._logged += 1
    logging.warning('%s: skipped an example (%s): %s.', self.what, problem, description)
    if self._logged == self.limit:
      logging.warning('%s: further skipped examples are only counted (damaged shards are still named).',
                      self.what)


def webdataset_source(pattern: str) -> Source:
  """Web shards converted to ArrayRecord files (data/records.py; `python -m hivlp_jax.data.convert_shards`)."""
  if any(part.strip().endswith(('.tar', '.tar}')) for part in pattern.split(',')):
    raise errors.InputError(
        f'config.data.shards={pattern!r} names webdataset tars. Training reads them converted to ArrayRecord files '
        '(random access, so an exact resume and a global shuffle): run `python -m hivlp_jax.data.convert_shards '
        f"--shards='{pattern}' --out_dir=DIR` once and set config.data.shards='DIR/*.array_record'.")
  examples = records.array_record_examples(pattern)
  return Source('webdataset', examples, tuple(examples.paths))


def _entry_example(entry: dict) -> RawExample:
  return RawExample(entry['filename'], entry['path'], tuple(entry['captions']),
                    '' if entry['captions'] else 'empty_captions', origin=entry['path'])


def karpathy_examples(name: str, manual_dir: str, split: str) -> list[RawExample]:
  """The examples of a split of Flickr30K or COCO from Karpathy's JSON + image folders in `manual_dir`."""
  if name not in karpathy.LAYOUTS:
    raise errors.InputError(f'No Karpathy layout for {name!r}; known: {sorted(karpathy.LAYOUTS)}.')
  return [_entry_example(e) for e in karpathy.read_manual_split(manual_dir, karpathy.LAYOUTS[name], split)]


def karpathy_source(name: str, manual_dir: str, split: str = 'train') -> Source:
  return Source(name, karpathy_examples(name, manual_dir, split))


def msrvtt_source(manual_dir: str, split: str = 'train') -> Source:
  """MSR-VTT's clips (data/msrvtt.py); the workers decode the video files."""
  examples = [RawExample(e['video_id'], e['path'], tuple(e['captions']), '' if e['captions'] else 'empty_captions',
                         origin=e['path'], kind='video') for e in msrvtt.read_split(manual_dir, split)]
  return Source('msrvtt', examples)


def tfds_example(example: dict) -> RawExample:
  """A TFDS example read with the image undecoded -> RawExample.

  Maps coco_captions/2014 ('captions': {'text': [...], 'id': [...]}) and our Flickr30k builder
  ('captions': [...]); both have 'image' (JPEG bytes) and 'image/filename'.
  """
  captions = example['captions']
  if isinstance(captions, dict):
    captions = captions['text']
  texts = tuple(c.decode('utf-8').strip() if isinstance(c, bytes) else str(c).strip() for c in captions)
  texts = tuple(t for t in texts if t)
  filename = example['image/filename']
  key = filename.decode('utf-8') if isinstance(filename, bytes) else str(filename)
  return RawExample(key, bytes(example['image']), texts, '' if texts else 'empty_captions')


def tfds_builder(name: str, data_dir: str, manual_dir: str = ''):
  """The prepared TFDS builder of 'coco' (coco_captions/2014) or 'flickr30k' (ours, from the manual dir), in the
  ArrayRecord format (random access)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (only TFDS sources need it)
  from hivlp_jax.data import flickr30k  # pylint: disable=g-import-not-at-top
  if name not in TFDS_NAMES:
    raise errors.InputError(f'No TFDS builder for {name!r}; known: {sorted(TFDS_NAMES)}.')
  try:
    builder = (flickr30k.Flickr30k(data_dir=data_dir, file_format='array_record') if name == 'flickr30k' else
               tfds.builder(TFDS_NAMES[name], data_dir=data_dir, file_format='array_record'))
  except ValueError as e:  # TFDS: 'File format is already set to ...' by a build in another format.
    if 'file format' not in str(e).lower():
      raise
    raise errors.InputError(
        f'The TFDS build of {TFDS_NAMES[name]} in {data_dir!r} (config.data.data_dir) is not in the ArrayRecord '
        f'format ({e}); training reads it at random, which needs ArrayRecord. Rebuild it with `tfds build '
        f'{TFDS_NAMES[name].split("/")[0]} --file_format=array_record` (our flickr30k builder: delete its folder '
        'and run again).') from None
  if builder.is_prepared():
    return builder
  if name == 'flickr30k':
    flickr30k.LAYOUT.check(manual_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder
  raise errors.MissingInputError(
      f'TFDS {TFDS_NAMES[name]} is not prepared in {data_dir!r} (config.data.data_dir) in the ArrayRecord format. '
      f'Build it once with `tfds build coco_captions --file_format=array_record --data_dir={data_dir}`: it '
      "downloads COCO 2014 train + val (about 19 GB) and Karpathy's caption_datasets.zip. Or set "
      f"config.data.source='karpathy' and put {karpathy.COCO.splits_file}, train2014/ and val2014/ in "
      'config.data.manual_dir.')


class TfdsExamples:
  """The examples of TFDS splits (ArrayRecord files) in order, read at random with the images undecoded."""

  def __init__(self, builder, splits: Sequence[str]):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.origin = f'{builder.name} {"+".join(splits)}'
    self._parts = [builder.as_data_source(split, decoders={'image': tfds.decode.SkipDecoding()}) for split in splits]
    self._starts = np.cumsum([0] + [len(part) for part in self._parts])
    self.paths = [str(path) for split in splits for path in builder.info.splits[split].filepaths]

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, index: int) -> RawExample:
    if not 0 <= index < len(self):
      raise IndexError(index)
    part = int(np.searchsorted(self._starts, index, side='right')) - 1
    example = tfds_example(self._parts[part][index - int(self._starts[part])])
    return dataclasses.replace(example, origin=f'{self.origin} #{index}')


def tfds_source(name: str, data_dir: str, split: str = 'train', manual_dir: str = '') -> Source:
  """A prepared TFDS data set in the ArrayRecord format (coco's 'train' is Karpathy's train + restval)."""
  examples = TfdsExamples(tfds_builder(name, data_dir, manual_dir), TFDS_SPLITS[name][split])
  return Source(name, examples, tuple(examples.paths))


def source_from_config(config: ml_collections.ConfigDict, split: str = 'train',
                       name: Optional[str] = None) -> Source:
  """The source that config.data names: 'webdataset', 'msrvtt', or 'flickr30k' / 'coco' read as config.data.source."""
  data = config.data
  name = name or data.name
  if name == 'webdataset':
    if split != 'train':
      raise errors.InputError('Web shards have no evaluation split: set config.data.eval_name to flickr30k or coco.')
    return webdataset_source(data.shards)
  if name == 'msrvtt':
    return msrvtt_source(data.manual_dir, split)
  if name not in karpathy.LAYOUTS:
    raise errors.InputError(f'config.data.name={name!r} has no streaming reader; known: webdataset, msrvtt, '
                            f'{", ".join(sorted(karpathy.LAYOUTS))}.')
  if data.source == 'karpathy':
    return karpathy_source(name, data.manual_dir, split)
  if data.source == 'tfds':
    return tfds_source(name, data.data_dir, split, data.manual_dir)
  raise errors.InputError(f"config.data.source={data.source!r} must be 'karpathy' (JSON + image folders in "
                          "config.data.manual_dir) or 'tfds' (a prepared TFDS builder in config.data.data_dir).")


def fingerprint(source: Source) -> str:
  """12 hex digits that change when the source's training data does: a vocabulary trained on it is keyed by them.

  Sources in memory hash every example's key and captions; sources in files (ArrayRecord, TFDS) hash the
  files' names and sizes (reading every caption of web shards would take minutes).
  """
  digest = hashlib.sha256(source.name.encode())
  if source.files:
    for path in source.files:
      digest.update(f'{path}:{files.path(path).stat().length}\1'.encode())
  else:
    for example in source.examples:
      digest.update('\0'.join((example.key,) + example.captions).encode() + b'\1')
  return digest.hexdigest()[:12]


def caption_texts(config: ml_collections.ConfigDict, limit: Optional[int] = None,
                  stats: Optional[webdataset.ReadStats] = None) -> Iterator[str]:
  """Training captions of config.data's source (for training a WordPiece vocabulary), at most `limit`.

  Unusable examples, malformed JSON members and damaged shards are skipped, counted in `stats` and named
  in the log (as `SkipLog` does); the counts are logged once the captions are read.
  """
  source = source_from_config(config, 'train')
  stats = webdataset.ReadStats() if stats is None else stats
  skip_log = SkipLog(f'Vocabulary captions of {source.name}')

  def texts():
    for example in source.examples:
      if example.problem:
        stats.count(example.problem)
        if skip_log.take(example.problem):
          skip_log.log(example.problem, example.describe())
        continue
      stats.samples += 1
      yield from example.captions

  yield from itertools.islice(texts(), limit)
  logging.info('Vocabulary captions of %s: %s.', source.name, webdataset.count_by_reason(stats))
