"""Image ops of the streaming pipeline: Inception-style random resized crops and centre crops, decoded in one pass.

Images are decoded and transformed with PIL, which releases the GIL in JPEG decoding and resizing. On a
~450 px JPEG, decoding + crop + resize to 224 px took 3.0-4.3 ms on one thread of a busy 2-core machine,
against 4.0-6.5 ms for tf.image (decode_and_crop_jpeg + antialiased resize); benchmarks/input_pipeline.py
measures both. JPEGs much larger than the crop are decoded at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling,
`Image.draft`).
"""

import io
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
from PIL import Image

# Inception / torchvision RandomResizedCrop aspect range.
ASPECT_RATIO = (3 / 4, 4 / 3)
# Boxes are (left, top, right, bottom) in pixels of the full image.


class Augment(NamedTuple):
  """Training augmentation (config.data.crop_scale, crop_ratio, flip): a random resized crop of area a
  uniform fraction `scale` of the image and aspect log-uniform in `ratio`, mirrored with probability 1/2
  when `flip` (off for data where left and right matter: arrows, text, "facing right")."""
  scale: tuple[float, float] = (0.5, 1.0)
  ratio: tuple[float, float] = ASPECT_RATIO
  flip: bool = True

  def flipped(self, rng: np.random.Generator) -> bool:
    return bool(rng.random() < 0.5) and self.flip  # Drawn either way: the crops do not depend on `flip`.


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: Sequence[float] = (0.5, 1.0), ratio: Sequence[float] = ASPECT_RATIO,
                            attempts: int = 10) -> tuple[int, int, int, int]:
  """Inception-style crop: area a uniform fraction `scale` of the image, aspect log-uniform in `ratio`.

  After `attempts` crops that do not fit, the largest centred crop with an aspect in `ratio` (torchvision).
  """
  area, log_ratio = height * width, np.log(ratio)
  for _ in range(attempts):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = np.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w, h = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
      return left, top, left + w, top + h
  w, h = width, height
  if width / height < min(ratio):
    h = int(round(width / min(ratio)))
  elif width / height > max(ratio):
    w = int(round(height * max(ratio)))
  left, top = (width - w) // 2, (height - h) // 2
  return left, top, left + w, top + h


def center_crop_box(height: int, width: int) -> tuple[int, int, int, int]:
  """The centred square: resizing it to S equals resizing the shorter side to S, then centre-cropping."""
  side = min(height, width)
  left, top = (width - side) // 2, (height - side) // 2
  return left, top, left + side, top + side


def crop_and_resize(image: Union[np.ndarray, Image.Image], box: Sequence[float], size: int,
                    flip: bool = False) -> np.ndarray:
  """uint8 [size, size, 3] of `box` of `image` (uint8 [H, W, 3] or PIL), antialiased bilinear, maybe mirrored."""
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  # One resample over the box: cropping and resizing in one pass, and PIL releases the GIL while it runs.
  out = image.resize((size, size), Image.Resampling.BILINEAR, box=tuple(float(b) for b in box))
  if flip:
    out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(out)


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator,
                        augment: Augment = Augment()) -> np.ndarray:
  """Training augmentation of a decoded image uint8 [H, W, 3]: random resized crop + horizontal flip."""
  box = random_resized_crop_box(image.shape[0], image.shape[1], rng, augment.scale, augment.ratio)
  return crop_and_resize(image, box, size, flip=augment.flipped(rng))


def resize_and_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Evaluation transform of a decoded image uint8 [H, W, 3]: shorter side to `size`, centre crop."""
  return crop_and_resize(image, center_crop_box(image.shape[0], image.shape[1]), size)


def _open_reduced(data: bytes, box: Sequence[int], size: int) -> tuple[Image.Image, tuple]:
  """Opens encoded image bytes as RGB, JPEGs decoded at the smallest DCT scale that keeps `box`
  at least `size` px on each side. Returns the image and `box` in its pixels."""
  image = Image.open(io.BytesIO(data))
  factor = min(box[2] - box[0], box[3] - box[1]) / size
  if factor >= 2:
    width, height = image.size
    # draft picks the largest reduction s in {1, 2, 4, 8} with W // s >= the requested width, so s <= factor.
    drafted = image.draft('RGB', (int(np.ceil(width / factor)), int(np.ceil(height / factor))))
    if drafted is not None:
      reduction = width / drafted[1][2]
      box = tuple(b / reduction for b in box)
  return image.convert('RGB'), box


def header_size(data: bytes) -> Optional[tuple[int, int]]:
  """(width, height) from the header of encoded image bytes; None when they are not an image."""
  try:
    with Image.open(io.BytesIO(data)) as header:
      return header.size
  except Exception:  # pylint: disable=broad-except  (PIL raises many kinds on non-images)
    return None


def decode_for_training(data: bytes, size: int, rng: np.random.Generator,
                        augment: Augment = Augment()) -> Optional[np.ndarray]:
  """`random_resized_crop` of encoded image bytes; None when they are not a readable image.

  Equal to decoding then `random_resized_crop` with the same generator, up to the JPEG draft scale.
  """
  try:
    with Image.open(io.BytesIO(data)) as header:
      width, height = header.size  # Read from the header only.
    box = random_resized_crop_box(height, width, rng, augment.scale, augment.ratio)
    flip = augment.flipped(rng)
    image, box = _open_reduced(data, box, size)
    return crop_and_resize(image, box, size, flip)
  except Exception:  # pylint: disable=broad-except  (web images fail in many ways; each one is skipped)
    return None


def decode_for_eval(data: bytes, size: int) -> Optional[np.ndarray]:
  """`resize_and_center_crop` of encoded image bytes; None when they are not a readable image."""
  try:
    with Image.open(io.BytesIO(data)) as header:
      width, height = header.size
    image, box = _open_reduced(data, center_crop_box(height, width), size)
    return crop_and_resize(image, box, size)
  except Exception:  # pylint: disable=broad-except  (the caller reports unreadable evaluation images)
    return None
