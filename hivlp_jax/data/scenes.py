"""Procedural image-caption scenes: the embedded default data set, in plain numpy.

A scene is 1 to 3 objects on a 3x3 grid of cells. Each object has a shape, a colour, a size and a cell, and
no two objects share a cell. Images are small RGB arrays; every image gets 5 different captions that name
every object with all four attributes, in different orders and with synonyms, so that only the whole
composition singles out an image.

Everything here is a deterministic function of (split, index): the TFDS builder in `embedded_scenes.py`
only packages it.
"""

import hashlib
from typing import NamedTuple, Sequence

import numpy as np

from hivlp_jax import errors

SHAPES = ('circle', 'square', 'triangle', 'cross')
COLOURS = ('red', 'green', 'blue', 'yellow', 'magenta', 'cyan', 'white')
SIZES = ('small', 'large')
# Cells in row-major order on the 3x3 grid.
CELLS = ('top left', 'top', 'top right', 'left', 'center', 'right', 'bottom left', 'bottom', 'bottom right')

RGB = {
    'red': (220, 40, 40), 'green': (40, 200, 60), 'blue': (50, 80, 230), 'yellow': (230, 220, 40),
    'magenta': (210, 50, 210), 'cyan': (40, 210, 220), 'white': (235, 235, 235),
}
# Synonyms used by the paraphrases; the first entry is the canonical word.
SHAPE_WORDS = {'circle': ('circle', 'disc', 'dot'), 'square': ('square', 'box', 'block'),
               'triangle': ('triangle', 'wedge'), 'cross': ('cross', 'plus')}
COLOUR_WORDS = {'red': ('red', 'scarlet'), 'green': ('green', 'lime'), 'blue': ('blue', 'navy'),
                'yellow': ('yellow', 'golden'), 'magenta': ('magenta', 'purple'), 'cyan': ('cyan', 'turquoise'),
                'white': ('white', 'pale')}
SIZE_WORDS = {'small': ('small', 'little', 'tiny'), 'large': ('large', 'big', 'huge')}
CELL_WORDS = {
    'top left': ('top left', 'upper left'), 'top': ('top', 'top middle'), 'top right': ('top right', 'upper right'),
    'left': ('left', 'middle left'), 'center': ('center', 'middle'), 'right': ('right', 'middle right'),
    'bottom left': ('bottom left', 'lower left'), 'bottom': ('bottom', 'bottom middle'),
    'bottom right': ('bottom right', 'lower right'),
}
# Radius of each size, in grid cells: small enough that objects in neighbouring cells never overlap.
RADIUS_IN_CELLS = {'small': 0.25, 'large': 0.41}
SPLIT_SEEDS = {'train': 0, 'validation': 1, 'test': 2}
# Share of the scene space each split may draw from, by a hash of the scene: splits never share a scene.
SPLIT_BUCKETS = {'train': range(0, 80), 'validation': range(80, 90), 'test': range(90, 100)}
NUM_CAPTIONS = 5


class SceneObject(NamedTuple):
  shape: str
  colour: str
  size: str
  cell: int  # Index into CELLS.


def scene_key(objects: Sequence[SceneObject]) -> str:
  """Canonical text of a scene, independent of the order of its objects."""
  return ';'.join(sorted(f'{o.cell}:{o.size}:{o.colour}:{o.shape}' for o in objects))


def split_of_scene(objects: Sequence[SceneObject]) -> str:
  bucket = int(hashlib.md5(scene_key(objects).encode()).hexdigest(), 16) % 100
  return next(split for split, buckets in SPLIT_BUCKETS.items() if bucket in buckets)


def random_object(cell: int, rng: np.random.Generator) -> SceneObject:
  return SceneObject(shape=SHAPES[rng.integers(len(SHAPES))], colour=COLOURS[rng.integers(len(COLOURS))],
                     size=SIZES[rng.integers(len(SIZES))], cell=cell)


def sample_scene(rng: np.random.Generator) -> list[SceneObject]:
  num_objects = rng.choice([1, 2, 3], p=[0.2, 0.4, 0.4])
  cells = rng.choice(len(CELLS), size=num_objects, replace=False)
  return [random_object(int(c), rng) for c in sorted(cells)]


def generate_scenes(split: str, num_scenes: int) -> list[list[SceneObject]]:
  """`num_scenes` distinct scenes that belong to `split`, the same on every call."""
  rng = np.random.default_rng(SPLIT_SEEDS[split])
  scenes, seen = [], set()
  while len(scenes) < num_scenes:
    objects = sample_scene(rng)
    key = scene_key(objects)
    if key in seen or split_of_scene(objects) != split:
      continue
    seen.add(key)
    scenes.append(objects)
  return scenes


def shape_mask(shape: str, radius, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
  """Which pixels `shape` covers, given their offsets (yy, xx) from its centre; radius and offsets broadcast."""
  if shape == 'circle':
    return yy**2 + xx**2 <= radius**2
  if shape == 'square':
    return (np.abs(yy) <= radius * 0.85) & (np.abs(xx) <= radius * 0.85)
  if shape == 'triangle':  # Apex up.
    return (yy <= radius * 0.8) & (yy >= -radius) & (np.abs(xx) <= (yy + radius) * 0.6)
  if shape == 'cross':
    arm = np.maximum(radius * 0.35, 0.75)
    return ((np.abs(yy) <= arm) & (np.abs(xx) <= radius)) | ((np.abs(xx) <= arm) & (np.abs(yy) <= radius))
  raise errors.InputError(f'Unknown shape {shape!r}; expected one of {SHAPES}.')


def background(image_size: int, rng: np.random.Generator) -> np.ndarray:
  """A noisy dark background. Returns float64 [image_size, image_size, 3] (drawn on, then cast)."""
  background_rgb = rng.integers(10, 50, size=3)
  return np.clip(background_rgb + rng.normal(0, 6, size=(image_size, image_size, 3)), 0, 255)


def radius(size: str, image_size: int) -> float:
  """An object's radius in pixels: a share of a grid cell (image_size / 3)."""
  return image_size / 3 * RADIUS_IN_CELLS[size]


def object_rgb(colour: str, rng: np.random.Generator) -> np.ndarray:
  """The colour's RGB with a little noise, so no two objects of a colour are the same. float64 [3]."""
  return np.clip(np.array(RGB[colour]) + rng.normal(0, 8, size=3), 0, 255)


def paint_shape(image: np.ndarray, shape: str, rgb: np.ndarray, cy: float, cx: float, size: float) -> None:
  """Paints `shape` of radius `size` (pixels) centred at (cy, cx) into `image` [S, S, 3], in place."""
  yy, xx = np.mgrid[:image.shape[0], :image.shape[1]] + 0.5
  image[shape_mask(shape, size, yy - cy, xx - cx)] = rgb


def draw_object(image: np.ndarray, obj: SceneObject, rng: np.random.Generator) -> None:
  """Paints `obj` into its cell of the 3x3 grid of `image` [S, S, 3], in place."""
  image_size = image.shape[0]
  cell_size = image_size / 3
  row, col = divmod(obj.cell, 3)
  # Small enough jitter and radius that objects in neighbouring cells never overlap.
  jitter = rng.uniform(-0.08, 0.08, size=2) * cell_size
  cy, cx = (row + 0.5) * cell_size + jitter[0], (col + 0.5) * cell_size + jitter[1]
  paint_shape(image, obj.shape, object_rgb(obj.colour, rng), cy, cx, radius(obj.size, image_size))


def render(objects: Sequence[SceneObject], image_size: int, rng: np.random.Generator) -> np.ndarray:
  """Draws a scene. Returns uint8 [image_size, image_size, 3]."""
  image = background(image_size, rng)
  for obj in objects:
    draw_object(image, obj, rng)
  return image.astype(np.uint8)


# Each template writes one object; {s}, {c}, {h}, {p} are size, colour, shape and place words.
_OBJECT_TEMPLATES = (
    'a {s} {c} {h} in the {p}',
    'a {s} {c} {h} at the {p}',
    'in the {p} a {s} {c} {h}',
    '{p} : a {s} {c} {h}',
)
CAPTION_PREFIXES = ('', 'a picture of ', 'there is ')
_JOINERS = (' and ', ' , ', ' with ')


def _object_phrase(obj: SceneObject, rng: np.random.Generator) -> str:
  pick = lambda options: options[rng.integers(len(options))]
  return pick(_OBJECT_TEMPLATES).format(
      s=pick(SIZE_WORDS[obj.size]), c=pick(COLOUR_WORDS[obj.colour]), h=pick(SHAPE_WORDS[obj.shape]),
      p=pick(CELL_WORDS[CELLS[obj.cell]]))


def make_captions(objects: Sequence[SceneObject], rng: np.random.Generator,
                  prefixes: Sequence[str] = CAPTION_PREFIXES) -> list[str]:
  """NUM_CAPTIONS different paraphrases, each naming every object with all its attributes."""
  captions = []
  while len(captions) < NUM_CAPTIONS:
    order = rng.permutation(len(objects))
    phrases = [_object_phrase(objects[i], rng) for i in order]
    joiner = _JOINERS[rng.integers(len(_JOINERS))]
    caption = prefixes[rng.integers(len(prefixes))] + joiner.join(phrases)
    if caption not in captions:
      captions.append(caption)
  return captions


def make_example(split: str, index: int, objects: Sequence[SceneObject], image_size: int) -> dict:
  """The image and captions of scene `index` of `split`, deterministic in (split, index)."""
  rng = np.random.default_rng([SPLIT_SEEDS[split], index])
  return {
      'image': render(objects, image_size, rng),
      'captions': make_captions(objects, rng),
      'objects': object_features(objects),
  }


def object_features(objects: Sequence[SceneObject]) -> dict[str, list[int]]:
  """The objects as the builder's 'objects' feature: class indices of shape, colour, size and cell."""
  return {'shape': [SHAPES.index(o.shape) for o in objects], 'colour': [COLOURS.index(o.colour) for o in objects],
          'size': [SIZES.index(o.size) for o in objects], 'cell': [o.cell for o in objects]}
