"""Reader of img2dataset-style webdataset shards: tar files of `<key>.jpg` + `<key>.txt` and/or `<key>.json`.

Reads shards front to back without unpacking them (local or on an object store, through hivlp_jax/files.py),
for the conversion to ArrayRecord files that training reads (data/convert_shards.py), and names and counts
what it cannot use instead of crashing: corrupt images, empty captions, missing parts, malformed `.json` members, and truncated or
corrupt tar files (whose samples before the damage are kept).
"""

import collections
import dataclasses
import json
import lzma
import re
import tarfile
from typing import Callable, Iterator, NamedTuple, Optional
import zlib

import jax
import numpy as np

from hivlp_jax import errors
from hivlp_jax import files

IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')
# What reading a damaged tar (or its compression) raises.
READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)


@dataclasses.dataclass
class ReadStats:
  """Examples used ('samples') and skipped, by reason. A damaged shard counts once per read (each epoch)."""
  samples: int = 0
  corrupt_images: int = 0
  empty_captions: int = 0
  missing_parts: int = 0
  malformed_json: int = 0
  corrupt_shards: int = 0
  corrupt_videos: int = 0  # Video files (MSR-VTT) that do not decode.

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)

  def count(self, reason: str) -> None:
    setattr(self, reason, getattr(self, reason) + 1)

  @classmethod
  def from_dict(cls, counts: dict) -> 'ReadStats':
    """From `as_dict()`; reasons it does not name (saved by an older version) start at 0."""
    return cls(**{k: int(v) for k, v in counts.items() if k in cls.__dataclass_fields__})


def count_by_reason(stats: ReadStats) -> str:
  skipped = collections.OrderedDict((k, v) for k, v in stats.as_dict().items() if k != 'samples' and v)
  return f'{stats.samples} samples read' + (f'; skipped {dict(skipped)}' if skipped else '')


def global_stats(stats: ReadStats, gather: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> ReadStats:
  """`stats` summed over all processes. A collective: every process must call it at the same point.

  gather: int32 [...] -> int32 [processes, ...] (default: multihost_utils.process_allgather).
  """
  counts = np.array(list(stats.as_dict().values()), np.int64)
  if gather is None:
    if jax.process_count() == 1:
      return dataclasses.replace(stats)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    gather = multihost_utils.process_allgather
  # Gathered as two 31-bit words: JAX arrays are int32 without x64, and counts of a long run may pass 2**31.
  words = np.stack([counts >> 31, counts & (2**31 - 1)]).astype(np.int32)
  gathered = np.asarray(gather(words), np.int64)  # [processes, 2, reasons]
  total = ((gathered[:, 0] << 31) + gathered[:, 1]).sum(0)
  return ReadStats(*total.tolist())


_MAGIC = re.compile(r'[*?[]')


def _glob(pattern: str) -> list[str]:
  """Paths that match a glob, local or on an object store: the glob runs below its first wildcard part."""
  parts = pattern.split('/')
  first = next((i for i, part in enumerate(parts) if _MAGIC.search(part)), None)
  if first is None:
    return [pattern] if files.path(pattern).exists() else []
  base = '/'.join(parts[:first]) or ('/' if pattern.startswith('/') else '.')
  return sorted(str(p) for p in files.path(base).glob('/'.join(parts[first:])))


def expand_shards(pattern: str) -> list[str]:
  """Shard paths of a pattern, sorted: comma-separated parts, each a glob or a brace range.

  'data/cc3m/{00000..00331}.tar' (webdataset/img2dataset notation; the width of the first bound is kept),
  'data/web/*.tar', 'gs://bucket/web/*.tar', or 'a.tar,b.tar'. Raises FileNotFoundError naming the pattern
  when nothing matches.
  """
  paths = []
  for part in (p.strip() for p in pattern.split(',')):
    if not part:
      continue
    match = re.search(r'\{(\d+)\.\.(\d+)\}', part)
    if match:
      width, (first, last) = len(match.group(1)), (int(match.group(1)), int(match.group(2)))
      names = [part[:match.start()] + str(i).zfill(width) + part[match.end():] for i in range(first, last + 1)]
      paths.extend(p for name in names for p in _glob(name))
    else:
      paths.extend(_glob(part))
  if not paths:
    raise errors.MissingInputError(f'No webdataset shards match {pattern!r} (config.data.shards). Write shards with '
                                   'img2dataset (--output_format webdataset) and point the pattern at them, e.g. '
                                   "'data/cc3m/{00000..00331}.tar' or 'data/cc3m/*.tar'.")
  return sorted(dict.fromkeys(paths))


class _CheckedTarInfo(tarfile.TarInfo):
  """Raises on a damaged or missing header, where tarfile would end the archive silently (losing the rest).

  Only a zero block, the archive's end marker, ends it quietly: a tar cut at a member boundary or with
  garbage in a header is then reported like one cut inside a member.
  """

  @classmethod
  def fromtarfile(cls, tar):
    try:
      return super().fromtarfile(tar)
    except tarfile.EOFHeaderError:
      raise
    except tarfile.HeaderError as e:
      raise tarfile.ReadError(f'damaged or missing header at byte {tar.offset}: {e}') from None


def _samples_of_tar(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
  """Groups consecutive members by key (webdataset keeps a sample's files together).

  On a damaged tar, yields the sample being read with the members read whole, then raises the error (one
  of READ_ERRORS).
  """
  key, parts = None, {}
  try:
    with files.path(path).open('rb') as f, tarfile.open(fileobj=f, mode='r|*', tarinfo=_CheckedTarInfo) as tar:
      for member in tar:
        if not member.isfile():
          continue
        base = member.name.rsplit('/', 1)[-1]
        member_key, _, extension = base.partition('.')
        if member_key != key and key is not None:
          yield key, parts
          parts = {}
        key = member_key
        parts[extension.lower()] = tar.extractfile(member).read()
  except READ_ERRORS:
    if parts:
      yield key, parts
    raise
  if key is not None:
    yield key, parts


class Sample(NamedTuple):
  """One sample of a shard, undecoded. problem: '' when usable, else the `ReadStats` field that counts it."""
  key: str
  image: Optional[bytes]
  caption: Optional[str]
  problem: str = ''
  detail: str = ''  # Why it is unusable, where the reader knows more than the reason (a tar or JSON error).


def _caption(parts: dict[str, bytes]) -> Optional[str]:
  """The caption of a sample's parts, None without any; raises ValueError on a malformed .json member."""
  if 'txt' in parts:
    return parts['txt'].decode('utf-8', errors='replace').strip()
  if 'json' in parts:
    meta = json.loads(parts['json'])  # JSONDecodeError and UnicodeDecodeError are ValueErrors.
    if not isinstance(meta, dict):
      raise errors.InputError(f'a JSON {type(meta).__name__}, not an object')
    return str(meta.get('caption') or meta.get('text') or '').strip()
  return None


def raw_samples(shard: str) -> Iterator[Sample]:
  """Yields every `Sample` of one shard, in order, undecoded.

  Bad samples are yielded too (problem 'missing_parts', 'empty_captions' or 'malformed_json'), so that
  positions in a shard do not depend on decoding. A truncated or corrupt tar ends with one Sample of
  problem 'corrupt_shards' (key: the last good sample's, detail: the error) after the samples before it.
  """
  samples, last_key = _samples_of_tar(shard), ''
  while True:
    try:
      key, parts = next(samples)
    except StopIteration:
      return
    except READ_ERRORS as e:
      yield Sample(f'after {last_key!r}' if last_key else 'at its start', None, None, 'corrupt_shards',
                   f'{type(e).__name__}: {e}')
      return
    last_key = key
    image_bytes = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
    try:
      caption = _caption(parts)
    except ValueError as e:
      yield Sample(key, image_bytes, None, 'malformed_json', f'{key}.json: {e}')
      continue
    if image_bytes is None or caption is None:
      yield Sample(key, image_bytes, caption, 'missing_parts')
    elif not caption:
      yield Sample(key, image_bytes, caption, 'empty_captions')
    else:
      yield Sample(key, image_bytes, caption)
