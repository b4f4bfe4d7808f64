"""The in-memory image-caption split, shared by the embedded data set and the streamed evaluation splits."""

import dataclasses
from typing import Optional

import numpy as np


@dataclasses.dataclass
class ImageTextSplit:
  """One split, held in memory.

  images: uint8 [num_images, H, W, 3].
  tokens: int32 [num_images, captions_per_image, max_len].
  captions: num_images lists of captions_per_image str, the text of `tokens` (for display).
  """
  images: np.ndarray
  tokens: np.ndarray
  captions: Optional[list[list[str]]] = dataclasses.field(default=None, repr=False)
  # bool [num_images]: True where the captions were replaced by another image's (noisy-pair option).
  replaced: Optional[np.ndarray] = None
  # int32 [num_images, grid_h, grid_w]: visual-token ids of the images (masked vision modeling).
  image_codes: Optional[np.ndarray] = None
  # int [num_images]: items of one group come next to each other in the training order, so they mostly share
  # a batch (a clip and its reverse: hard negatives for frame order); None: every item on its own.
  groups: Optional[np.ndarray] = None

  @property
  def num_images(self) -> int:
    return self.images.shape[0]

  @property
  def captions_per_image(self) -> int:
    return self.tokens.shape[1]
