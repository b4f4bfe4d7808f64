"""Video files -> clips uint8 [T, S, S, 3]: decoded with PyAV (its wheels carry ffmpeg), frames sampled by
`frames.sample_frame_indices`, each frame cropped and resized like an image (data/images.py).

A clip is decoded once, from its start, and only the sampled frames are converted and resized; decoding
stops after the last of them. The frame count comes from the container (an mp4's sample table); when it
has none, the video packets are counted first. When a few frames fewer decode than it says (at most 2, or
5%), the frames are sampled again from those that decode; far fewer is a truncated file, refused as corrupt
(its last frames decode grey or garbled). Training crops one random box per clip (and
mirrors the whole clip or none of it), so all frames of a clip show the same region; evaluation takes the
centred square (shorter side resized to S, centre crop). An unreadable or corrupt file gives None, for the
caller to count.
"""

import io
from typing import Callable, Optional, Union

import numpy as np

from hivlp_jax import files
from hivlp_jax.data import frames as frames_lib
from hivlp_jax.data import images as images_lib

Opener = Callable[[], io.IOBase]


def _opener(video: Union[bytes, str]) -> Opener:
  if isinstance(video, bytes):
    return lambda: io.BytesIO(video)
  return lambda: files.path(video).open('rb')


def _count_packets(opener: Opener) -> int:
  """The number of video frames as the number of non-empty video packets (no decoding)."""
  import av  # pylint: disable=g-import-not-at-top  (only video data needs ffmpeg)
  with opener() as f, av.open(f) as container:
    stream = container.streams.video[0]
    return sum(1 for packet in container.demux(stream) if packet.size)


def _decode(opener: Opener, num_frames: int, size: int, rng: Optional[np.random.Generator],
            augment: images_lib.Augment, count: int = 0) -> Optional[np.ndarray]:
  import av  # pylint: disable=g-import-not-at-top
  with opener() as f, av.open(f) as container:
    stream = container.streams.video[0]
    count = count or stream.frames
    if count <= 0:  # No frame count in the container: count the packets, then decode.
      count = _count_packets(opener)
      return _decode(opener, num_frames, size, rng, augment, count) if count > 0 else None
    indices = frames_lib.sample_frame_indices(count, num_frames, rng)
    wanted, last = set(indices.tolist()), int(indices[-1])
    kept, box, flip, decoded = {}, None, False, 0
    for decoded, frame in enumerate(container.decode(stream), start=1):
      index = decoded - 1
      if index in wanted:
        if box is None:  # One box (and one mirror draw) for the whole clip.
          if rng is None:
            box = images_lib.center_crop_box(frame.height, frame.width)
          else:
            box = images_lib.random_resized_crop_box(frame.height, frame.width, rng, augment.scale, augment.ratio)
            flip = augment.flipped(rng)
        kept[index] = images_lib.crop_and_resize(frame.to_image(), box, size, flip)
      if index == last:
        return np.stack([kept[i] for i in indices.tolist()])
  if decoded and decoded >= count - max(2, count // 20):  # A few frames short of the container's count (edit lists, a
    return _decode(opener, num_frames, size, rng, augment, decoded)  # lost last frame): sample from those.
  return None  # Far fewer: a truncated file, whose last frames are grey or garbled.


def decode_clip(video: Union[bytes, str], size: int, num_frames: int, rng: Optional[np.random.Generator] = None,
                augment: images_lib.Augment = images_lib.Augment()) -> Optional[np.ndarray]:
  """uint8 [num_frames, size, size, 3] of a video file (its path) or its bytes; None when it is not readable.

  With `rng` (training): a random frame of each segment and a random resized crop shared by all frames
  (`augment`); without (evaluation): the segment centres and the centred square. A clip shorter than
  `num_frames` repeats frames.
  """
  try:
    return _decode(_opener(video), num_frames, size, rng, augment)
  except FileNotFoundError:
    raise
  except Exception:  # pylint: disable=broad-except  (ffmpeg fails in many ways on damaged files; each is skipped)
    return None


def read_clip(path: str, size: int, num_frames: int, rng: Optional[np.random.Generator] = None,
              augment: images_lib.Augment = images_lib.Augment()) -> tuple[Optional[np.ndarray], str]:
  """(`decode_clip` of a video file, '') or (None, the `webdataset.ReadStats` field of why not:
  'missing_parts' for a missing file, 'corrupt_videos' for one that does not decode)."""
  try:
    clip = decode_clip(path, size, num_frames, rng, augment)
  except FileNotFoundError:
    return None, 'missing_parts'
  return clip, '' if clip is not None else 'corrupt_videos'


def is_readable(path: str) -> bool:
  """Whether a video file opens and has a video stream (its header only; nothing is decoded)."""
  import av  # pylint: disable=g-import-not-at-top
  try:
    with files.path(path).open('rb') as f, av.open(f) as container:
      return bool(container.streams.video)
  except Exception:  # pylint: disable=broad-except
    return False
