"""Web examples as ArrayRecord files: the record format, and a random-access reader of the files.

Tar shards can only be read front to back; ArrayRecord files (written by data/convert_shards.py) give grain
random access to every example, so an epoch can be any permutation and a resume lands on the exact example.
A record is one usable example, a msgpack map:
  key: str; image: bytes (the encoded JPEG/PNG/WebP as it was in the tar); captions: [str]; kind: 'image'.
ArrayRecord files are opened by array_record's C++ reader and writer, which take local paths only.
"""

import bisect
import concurrent.futures
import dataclasses
from typing import Sequence, SupportsIndex

from array_record.python import array_record_module
import grain
import msgpack

from hivlp_jax import errors
from hivlp_jax.data import raw_examples
from hivlp_jax.data import webdataset

CONVERT_COMMAND = ("python -m hivlp_jax.data.convert_shards --shards='data/web/{00000..00009}.tar' "
                   '--out_dir=data/web_ar')
_FIELDS = {'key': str, 'image': bytes, 'captions': list, 'kind': str}
# Files opened at once to count their records: enough to hide a network disk's latency.
_OPEN_THREADS = 16


def encode(example: raw_examples.RawExample) -> bytes:
  """A usable image example (problem '', image bytes, at least one caption) -> its record."""
  if example.problem or not isinstance(example.image, bytes) or not example.captions or example.kind != 'image':
    raise ValueError(f'Only usable image examples with image bytes and captions are written; got {example!r:.200}.')
  return msgpack.packb({'key': example.key, 'image': example.image, 'captions': list(example.captions),
                        'kind': example.kind}, use_bin_type=True)


def decode(record: bytes, origin: str = '') -> raw_examples.RawExample:
  """A record of `encode` -> its RawExample (origin: where the record is, to name it in errors)."""
  try:
    fields = msgpack.unpackb(record, raw=False)
  except (ValueError, msgpack.UnpackException) as e:  # Bad UTF-8 in a str is a ValueError too.
    raise errors.InputError(f'{origin or "A record"} is not a msgpack record of an example ({e!r:.100}). '
                            f'Write such files with `{CONVERT_COMMAND}`.') from None
  if (not isinstance(fields, dict) or any(not isinstance(fields.get(k), t) for k, t in _FIELDS.items())
      or not all(isinstance(c, str) for c in fields['captions'])):
    got = list(fields) if isinstance(fields, dict) else type(fields).__name__
    raise errors.InputError(f'{origin or "A record"} is not an example record: a map of {list(_FIELDS)} was '
                            f'expected, got {got!r:.200}. Write such files with `{CONVERT_COMMAND}`.')
  return raw_examples.RawExample(fields['key'], fields['image'], tuple(fields['captions']), origin=origin,
                            kind=fields['kind'])


@dataclasses.dataclass(frozen=True)
class _FileRecords:
  """A whole file as grain's FileInstruction protocol, so grain need not open every file again to count."""
  filename: str
  skip: int
  take: int
  examples_in_shard: int


def _count_records(path: str) -> int:
  reader = array_record_module.ArrayRecordReader(path)
  # A missing, truncated or foreign file opens without raising: `ok()` is the only sign (0 records else), and
  # close() would raise the reader's error without naming the file.
  if not reader.ok():
    raise errors.InputError(f'{path!r} is not a readable ArrayRecord file (missing, truncated by a killed write, '
                            'or another format; ArrayRecord files are read from local paths only). '
                            f'Write such files with `{CONVERT_COMMAND}`.')
  count = reader.num_records()
  reader.close()
  return count


class ArrayRecordExamples:
  """The examples of ArrayRecord files in order, by index: `examples[i]` -> RawExample.

  Thread-safe (grain's source shares one thread-safe reader per file) and picklable (grain worker processes
  receive it; readers are reopened lazily after unpickling). origin of an example: '<file> record <position>'.
  """

  def __init__(self, paths: Sequence[str]):
    if not paths:
      raise errors.MissingInputError(f'No ArrayRecord files given. Write them with `{CONVERT_COMMAND}`.')
    self.paths = [str(p) for p in paths]
    with concurrent.futures.ThreadPoolExecutor(min(len(self.paths), _OPEN_THREADS)) as executor:
      self.counts = list(executor.map(_count_records, self.paths))
    self.starts = [0]  # starts[f]: the index of file f's first record; starts[-1]: the total.
    for count in self.counts:
      self.starts.append(self.starts[-1] + count)
    self._source = grain.sources.ArrayRecordDataSource(
        [_FileRecords(p, 0, n, n) for p, n in zip(self.paths, self.counts)])

  def __len__(self) -> int:
    return self.starts[-1]

  def _origin(self, index: int) -> str:
    file = bisect.bisect_right(self.starts, index) - 1
    return f'{self.paths[file]} record {index - self.starts[file]}'

  def _index(self, index: SupportsIndex) -> int:
    position = index.__index__()
    position += len(self) if position < 0 else 0
    if not 0 <= position < len(self):
      raise IndexError(f'Example {index} of {len(self)} ({len(self.paths)} ArrayRecord files).')
    return position

  def __getitem__(self, index: SupportsIndex) -> raw_examples.RawExample:
    position = self._index(index)
    return decode(self._source[position], self._origin(position))

  def __getitems__(self, indices: Sequence[SupportsIndex]) -> list[raw_examples.RawExample]:
    """Many examples at once (grain's batched read): the files are read in parallel."""
    positions = [self._index(i) for i in indices]
    return [decode(record, self._origin(p)) for record, p in zip(self._source.__getitems__(positions), positions)]

  def __repr__(self) -> str:
    return f'ArrayRecordExamples({len(self)} examples in {len(self.paths)} files, first {self.paths[0]!r})'


def files_of(pattern: str) -> list[str]:
  """The files of a pattern (a glob, a brace range or a comma list, as `webdataset.expand_shards`), sorted."""
  try:
    return webdataset.expand_shards(pattern)
  except errors.MissingInputError:
    raise errors.MissingInputError(
        f'No ArrayRecord files match {pattern!r}. Convert webdataset tars to them with `{CONVERT_COMMAND}`, '
        "then point the pattern at them, e.g. 'data/web_ar/*.array_record'.") from None


def array_record_examples(pattern: str) -> ArrayRecordExamples:
  """The examples of the ArrayRecord files that `pattern` names (see `files_of`)."""
  return ArrayRecordExamples(files_of(pattern))
