"""Which frames of a clip a video model sees: uniform segments, a random frame of each in training, the
segment centres in evaluation (CLIP4Clip / TSN sampling). Shared by every video source (the embedded
clips, MSR-VTT).

A clip of fewer frames than asked is padded by repeating frames (the indices repeat, in order), so a short
clip still gives `num_frames` frames; the docs say so (docs/data.md).
"""

from typing import Optional

import numpy as np

from hivlp_jax import errors


def sample_frame_indices(num_available: int, num_frames: int,
                         rng: Optional[np.random.Generator] = None) -> np.ndarray:
  """Indices int64 [num_frames], non-decreasing, into a clip of `num_available` frames.

  The clip is cut into `num_frames` equal segments [i * n / T, (i + 1) * n / T). With `rng` (training) each
  segment gives a uniformly random frame of it; without (evaluation) its centre frame. When
  num_available < num_frames, segments are shorter than one frame and frames repeat.
  """
  if num_available < 1:
    raise errors.InputError(f'A clip with {num_available} frames cannot give {num_frames} frames.')
  if num_frames < 1:
    raise errors.InputError(f'num_frames={num_frames} must be >= 1.')
  edges = np.arange(num_frames + 1) * (num_available / num_frames)
  starts, ends = edges[:-1], edges[1:]
  if rng is None:
    points = (starts + ends) / 2
  else:
    points = rng.uniform(starts, ends)
  return np.minimum(np.floor(points).astype(np.int64), num_available - 1)


def sample_clips(videos: np.ndarray, num_frames: int, rng: Optional[np.random.Generator] = None) -> np.ndarray:
  """Clips uint8 [B, num_frames, H, W, C] from stored clips [B, T, H, W, C], one draw per clip in training."""
  available = videos.shape[1]
  if rng is None:
    if available == num_frames:
      return videos
    return videos[:, sample_frame_indices(available, num_frames)]
  rows = np.stack([sample_frame_indices(available, num_frames, rng) for _ in range(videos.shape[0])])
  return np.take_along_axis(videos, rows.reshape(rows.shape + (1, 1, 1)), axis=1)
