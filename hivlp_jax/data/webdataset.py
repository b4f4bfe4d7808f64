"""Reader of img2dataset-style webdataset shards: tar files of `<key>.jpg` + `<key>.txt` and/or `<key>.json`.

Streams many shards without unpacking them, gives each host (`jax.process_index()`) its own shards, and
skips corrupt images and empty captions instead of crashing, counting both so runs can log them.
"""

import collections
import dataclasses
import glob
import io
import json
import os
import re
import tarfile
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')


@dataclasses.dataclass
class ReadStats:
  samples: int = 0
  corrupt_images: int = 0
  empty_captions: int = 0
  missing_parts: int = 0

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


def expand_shards(pattern: str) -> list[str]:
  """Shard paths of a pattern, sorted: comma-separated parts, each a glob or a brace range.

  'data/cc3m/{00000..00331}.tar' (webdataset/img2dataset notation; the width of the first bound is kept),
  'data/web/*.tar', or 'a.tar,b.tar'. Raises FileNotFoundError naming the pattern when nothing matches.
  """
  paths = []
  for part in (p.strip() for p in pattern.split(',')):
    if not part:
      continue
    match = re.search(r'\{(\d+)\.\.(\d+)\}', part)
    if match:
      width, (first, last) = len(match.group(1)), (int(match.group(1)), int(match.group(2)))
      names = [part[:match.start()] + str(i).zfill(width) + part[match.end():] for i in range(first, last + 1)]
      paths.extend(p for name in names for p in sorted(glob.glob(name)))
    else:
      paths.extend(sorted(glob.glob(part)))
  if not paths:
    raise FileNotFoundError(f'No webdataset shards match {pattern!r} (config.data.shards). Write shards with '
                            'img2dataset (--output_format webdataset) and point the pattern at them, e.g. '
                            "'data/cc3m/{00000..00331}.tar' or 'data/cc3m/*.tar'.")
  return sorted(dict.fromkeys(paths))


def shards_for_host(shards: Sequence[str], process_index: int, process_count: int) -> list[str]:
  """Round-robin assignment of shards to hosts: disjoint, and together all of them."""
  if len(shards) < process_count:
    raise ValueError(f'{len(shards)} shards cannot feed {process_count} hosts: each host needs at least one. '
                     'Write more, smaller shards.')
  return list(shards[process_index::process_count])


def _caption(parts: dict[str, bytes]) -> Optional[str]:
  if 'txt' in parts:
    return parts['txt'].decode('utf-8', errors='replace').strip()
  if 'json' in parts:
    meta = json.loads(parts['json'])
    return str(meta.get('caption') or meta.get('text') or '').strip()
  return None


def _samples_of_tar(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
  """Groups consecutive members by key (webdataset keeps a sample's files together)."""
  key, parts = None, {}
  with tarfile.open(path, 'r|*') as tar:
    for member in tar:
      if not member.isfile():
        continue
      base = os.path.basename(member.name)
      member_key, _, extension = base.partition('.')
      if member_key != key and key is not None:
        yield key, parts
        parts = {}
      key = member_key
      parts[extension.lower()] = tar.extractfile(member).read()
  if key is not None:
    yield key, parts


def raw_samples(shard: str) -> Iterator[tuple[str, Optional[bytes], Optional[str], str]]:
  """Yields (key, encoded image bytes, caption, problem) for every sample of one shard, in order, undecoded.

  problem: '' for a usable sample, else the `ReadStats` field that counts it ('missing_parts' or
  'empty_captions'). Bad samples are yielded too, so that positions in a shard do not depend on decoding.
  """
  for key, parts in _samples_of_tar(shard):
    image_bytes = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
    caption = _caption(parts)
    if image_bytes is None or caption is None:
      yield key, image_bytes, caption, 'missing_parts'
    elif not caption:
      yield key, image_bytes, caption, 'empty_captions'
    else:
      yield key, image_bytes, caption, ''


def decode_image(image_bytes: bytes) -> Optional[np.ndarray]:
  """uint8 [H, W, 3], or None for bytes that are not a readable image."""
  try:
    with Image.open(io.BytesIO(image_bytes)) as image:
      return np.asarray(image.convert('RGB'))
  except (OSError, ValueError, Image.DecompressionBombError):
    return None


def read_shards(shards: Iterable[str], stats: Optional[ReadStats] = None
                ) -> Iterator[tuple[str, np.ndarray, str]]:
  """Yields (key, uint8 image [H, W, 3], caption) for every good sample of the given shards, in order.

  Corrupt or missing images, and empty or missing captions, are skipped and counted in `stats`.
  """
  stats = stats if stats is not None else ReadStats()
  for shard in shards:
    for key, image_bytes, caption, problem in raw_samples(shard):
      if problem:
        setattr(stats, problem, getattr(stats, problem) + 1)
        continue
      array = decode_image(image_bytes)
      if array is None:
        stats.corrupt_images += 1
        continue
      stats.samples += 1
      yield key, array, caption


def count_by_reason(stats: ReadStats) -> str:
  skipped = collections.OrderedDict((k, v) for k, v in stats.as_dict().items() if k != 'samples' and v)
  return f'{stats.samples} samples read' + (f'; skipped {dict(skipped)}' if skipped else '')
