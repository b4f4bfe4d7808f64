"""Reader of img2dataset-style webdataset shards: tar files of `<key>.jpg` + `<key>.txt` and/or `<key>.json`.

Streams many shards without unpacking them, gives each host (`jax.process_index()`) its own shards, and
skips corrupt images and empty captions instead of crashing, counting both so runs can log them.
"""

import collections
import dataclasses
import io
import json
import os
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


def read_shards(shards: Iterable[str], stats: Optional[ReadStats] = None
                ) -> Iterator[tuple[str, np.ndarray, str]]:
  """Yields (key, uint8 image [H, W, 3], caption) for every good sample of the given shards, in order.

  Corrupt or missing images, and empty or missing captions, are skipped and counted in `stats`.
  """
  stats = stats if stats is not None else ReadStats()
  for shard in shards:
    for key, parts in _samples_of_tar(shard):
      image_bytes = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
      caption = _caption(parts)
      if image_bytes is None or caption is None:
        stats.missing_parts += 1
        continue
      if not caption:
        stats.empty_captions += 1
        continue
      try:
        with Image.open(io.BytesIO(image_bytes)) as image:
          array = np.asarray(image.convert('RGB'))
      except (OSError, ValueError, Image.DecompressionBombError):
        stats.corrupt_images += 1
        continue
      stats.samples += 1
      yield key, array, caption


def count_by_reason(stats: ReadStats) -> str:
  skipped = collections.OrderedDict((k, v) for k, v in stats.as_dict().items() if k != 'samples' and v)
  return f'{stats.samples} samples read' + (f'; skipped {dict(skipped)}' if skipped else '')
