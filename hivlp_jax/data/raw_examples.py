"""An undecoded example of a real data set, as every source reads it (data/sources.py, data/records.py)."""

import dataclasses
from typing import Union


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
