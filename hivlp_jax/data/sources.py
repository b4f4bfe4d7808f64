"""Sources of real image-caption data: web shards, Flickr30K and COCO, as shards that read into undecoded examples.

Flickr30K and COCO come as Karpathy's JSON + image folders (random access: each example its own shard) or
as a prepared TFDS build (sequential: one shard per TFDS file). Unusable examples are yielded too, marked
with the `webdataset.ReadStats` field that counts them, so that positions do not depend on decoding;
`SkipLog` names them in the log.
"""

import dataclasses
import functools
import hashlib
import itertools
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from absl import logging
import ml_collections

from hivlp_jax import errors
from hivlp_jax import files
from hivlp_jax.data import karpathy
from hivlp_jax.data import msrvtt
from hivlp_jax.data import webdataset

TFDS_NAMES = {'coco': 'coco_captions/2014', 'flickr30k': 'flickr30k'}
# Our split names -> TFDS split names, per data set (coco_captions keeps Karpathy's names).
TFDS_SPLITS = {'coco': {'train': ('train', 'restval'), 'validation': ('val',), 'test': ('test',)},
               'flickr30k': {'train': ('train',), 'validation': ('validation',), 'test': ('test',)}}


@dataclasses.dataclass(frozen=True)
class RawExample:
  """An undecoded example. image: encoded bytes, or the path of an image file (read by the worker), or
  with kind 'video' the path of a video file (decoded by the worker into a clip, data/videos.py).

  problem: '' for a usable example, else the `webdataset.ReadStats` field that counts it when skipped.
  origin: the file it comes from (its shard, or its image file), to name it when it is skipped.
  """
  key: str
  image: Union[bytes, str, None]
  captions: tuple[str, ...]
  problem: str = ''
  origin: str = ''
  detail: str = ''  # Why it is unusable, when the reader knows more than `problem` (a tar or JSON error).
  kind: str = 'image'  # Or 'video' (MSR-VTT).

  def describe(self) -> str:
    if not self.origin:
      where = self.key
    else:  # An image file's path already ends with its key.
      where = self.origin if self.origin.endswith(self.key) else f'{self.origin}: {self.key}'
    return where + (f' ({self.detail})' if self.detail else '')


@dataclasses.dataclass(frozen=True)
class Source:
  """A data set as shards. `read(shard)` yields a shard's `RawExample`s in a fixed order.

  random_access: each shard is one `RawExample` (read returns it), so an epoch can be any permutation.
  """
  name: str
  shards: Sequence[Any]
  read: Callable[[Any], Iterator[RawExample]]
  random_access: bool = False


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


def _read_web_shard(path: str) -> Iterator[RawExample]:
  for sample in webdataset.raw_samples(path):
    yield RawExample(sample.key, sample.image, (sample.caption,) if sample.caption else (), sample.problem,
                     origin=path, detail=sample.detail)


def webdataset_source(pattern: str) -> Source:
  """Tar shards of img2dataset's webdataset layout (see webdataset.expand_shards for the pattern)."""
  return Source('webdataset', webdataset.expand_shards(pattern), _read_web_shard)


def _entry_example(entry: dict) -> RawExample:
  return RawExample(entry['filename'], entry['path'], tuple(entry['captions']),
                    '' if entry['captions'] else 'empty_captions', origin=entry['path'])


def karpathy_examples(name: str, manual_dir: str, split: str) -> list[RawExample]:
  """The examples of a split of Flickr30K or COCO from Karpathy's JSON + image folders in `manual_dir`."""
  if name not in karpathy.LAYOUTS:
    raise errors.InputError(f'No Karpathy layout for {name!r}; known: {sorted(karpathy.LAYOUTS)}.')
  return [_entry_example(e) for e in karpathy.read_manual_split(manual_dir, karpathy.LAYOUTS[name], split)]


def karpathy_source(name: str, manual_dir: str, split: str = 'train') -> Source:
  return Source(name, karpathy_examples(name, manual_dir, split), lambda example: iter((example,)),
                random_access=True)


def msrvtt_source(manual_dir: str, split: str = 'train') -> Source:
  """MSR-VTT's clips (data/msrvtt.py), one random-access shard each; the workers decode the video files."""
  examples = [RawExample(e['video_id'], e['path'], tuple(e['captions']), '' if e['captions'] else 'empty_captions',
                         origin=e['path'], kind='video') for e in msrvtt.read_split(manual_dir, split)]
  return Source('msrvtt', examples, lambda example: iter((example,)), random_access=True)


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
  """The prepared TFDS builder of 'coco' (coco_captions/2014) or 'flickr30k' (ours, from the manual dir)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (only TFDS sources need it)
  if name == 'flickr30k':
    from hivlp_jax.data import flickr30k  # pylint: disable=g-import-not-at-top
    builder = flickr30k.Flickr30k(data_dir=data_dir)
    if not builder.is_prepared():
      flickr30k.LAYOUT.check(manual_dir)
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder
  if name != 'coco':
    raise errors.InputError(f'No TFDS builder for {name!r}; known: {sorted(TFDS_NAMES)}.')
  builder = tfds.builder(TFDS_NAMES[name], data_dir=data_dir)
  if not builder.is_prepared():
    raise errors.MissingInputError(
        f'TFDS {TFDS_NAMES[name]} is not prepared in {data_dir!r} (config.data.data_dir). Build it once with '
        f'`tfds build coco_captions --data_dir={data_dir}`: it downloads COCO 2014 train + val (about 19 GB) '
        "and Karpathy's caption_datasets.zip. Or set config.data.source='karpathy' and put "
        f"{karpathy.COCO.splits_file}, train2014/ and val2014/ in config.data.manual_dir.")
  return builder


def _read_tfds_shard(builder, shard: tuple[str, int]) -> Iterator[RawExample]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  split, index = shard
  dataset = builder.as_dataset(split=f'{split}[{index}shard:{index + 1}shard]', shuffle_files=False,
                               decoders={'image': tfds.decode.SkipDecoding()})
  origin = f'{builder.name} {split} shard {index}'
  for example in tfds.as_numpy(dataset):
    yield dataclasses.replace(tfds_example(example), origin=origin)


def tfds_source(name: str, data_dir: str, split: str = 'train', manual_dir: str = '') -> Source:
  """A prepared TFDS data set, one shard per TFDS file (read whole, so no file is re-read in an epoch)."""
  builder = tfds_builder(name, data_dir, manual_dir)
  shards = [(tfds_split, i) for tfds_split in TFDS_SPLITS[name][split]
            for i in range(builder.info.splits[tfds_split].num_shards)]
  return Source(name, shards, functools.partial(_read_tfds_shard, builder))


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

  Random-access sources hash every example's key and captions (in memory already); shard sources hash their
  shard names and, for files, their sizes (reading every caption of web shards would take minutes).
  """
  digest = hashlib.sha256(source.name.encode())
  for shard in source.shards:
    if isinstance(shard, RawExample):
      digest.update('\0'.join((shard.key,) + shard.captions).encode() + b'\1')
    else:
      size = files.path(shard).stat().length if isinstance(shard, str) else ''
      digest.update(f'{shard!r}:{size}\1'.encode())
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
    for example in (e for shard in source.shards for e in source.read(shard)):
      if example.problem:
        stats.count(example.problem)
        if skip_log.take(example.problem):
          skip_log.log(example.problem, example.describe())
        continue
      stats.samples += 1
      yield from example.captions

  yield from itertools.islice(texts(), limit)
  logging.info('Vocabulary captions of %s: %s.', source.name, webdataset.count_by_reason(stats))
