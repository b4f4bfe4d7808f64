"""Procedural clips of moving shapes: the embedded video data set, in plain numpy.

A clip is T frames (default 8) of one or two objects of `scenes.py` (shape, colour, size) on a still noisy
background. At least one object moves on a straight line (one of 8 directions, slow or fast, at constant
speed); a second one moves too or stays put; in half the clips one object also grows, shrinks or changes
colour over the clip (linearly). Objects never overlap or leave the frame, and the colours in a clip are all
different, so every object can be found by its colour. Each clip gets 5 paraphrased captions that name
every object (size and colour at the first frame), its motion and speed, and its change.

Order matters by construction: played backwards, a clip is another clip of the same split whose captions
say the opposite direction and the opposite change. After about half the clips of every split (`REVERSE_PROB`)
comes the clip reversed, marked by `reverse_of` (the forward clip's index); its frames are the forward
clip's frames in reverse order, so a model that ignores frame order cannot tell the two apart.

Same clip = same description (objects, change, direction and speed), whatever the start: a clip's split is a
hash of its description and of its reverse's (whichever sorts first), so the splits share no description,
no clip and no reversed clip, and no two clips of a split have the same description.
Everything is a deterministic function of (split, index): the TFDS builder in `embedded_videos.py` only
packages it.
"""

import hashlib
from typing import NamedTuple, Optional, Sequence

import numpy as np

from hivlp_jax.data import scenes

# (dy, dx) of each direction; y grows downwards, as in the image.
DIRECTIONS = {'left': (0, -1), 'right': (0, 1), 'up': (-1, 0), 'down': (1, 0),
              'up_left': (-1, -1), 'up_right': (-1, 1), 'down_left': (1, -1), 'down_right': (1, 1)}
OPPOSITE = {d: next(o for o, v in DIRECTIONS.items() if v == (-dy, -dx)) for d, (dy, dx) in DIRECTIONS.items()}
STILL = 'none'  # The direction and speed of an object that stays put.
# Distance travelled over the whole clip, as a share of the frame (7 and 14 px at 32 px): it does not
# depend on T, so a clip of any length fits in the frame.
DISTANCE = {'slow': 7 / 32, 'fast': 14 / 32}
SPEEDS = tuple(DISTANCE)
# Class names of the 'direction' and 'speed' features: STILL first.
MOTION_DIRECTIONS = (STILL,) + tuple(DIRECTIONS)
MOTION_SPEEDS = (STILL,) + SPEEDS

ONE_OBJECT_PROB = 0.1  # Low: the one-object descriptions are few (3,584 up to reversal) for a 20k split.
BOTH_MOVE_PROB = 0.5  # Of two-object clips: the second object moves too (else it stays put).
CHANGE_PROB = 0.5  # One object changes size or colour (half each).
REVERSE_PROB = 0.5  # A clip is followed by itself reversed.
PLACEMENT_TRIES = 64  # Start positions drawn for a description; dropped if none keeps its objects apart.
# Seeds of their own, so no clip draws the random numbers of a scene.
SPLIT_SEEDS = {'train': 200, 'validation': 201, 'test': 202}

VERB_WORDS = ('moves', 'slides', 'drifts', 'travels', 'glides', 'goes')
DIRECTION_WORDS = {
    'left': ('to the left', 'leftwards', 'left'), 'right': ('to the right', 'rightwards', 'right'),
    'up': ('up', 'upwards', 'toward the top'), 'down': ('down', 'downwards', 'toward the bottom'),
    'up_left': ('up and to the left', 'toward the upper left', 'up and left'),
    'up_right': ('up and to the right', 'toward the upper right', 'up and right'),
    'down_left': ('down and to the left', 'toward the lower left', 'down and left'),
    'down_right': ('down and to the right', 'toward the lower right', 'down and right'),
}
SPEED_WORDS = {'slow': ('slowly', 'gently'), 'fast': ('quickly', 'rapidly')}
STILL_WORDS = ('stays put', 'stays still', 'does not move', 'sits still', 'stays where it is')
SIZE_CHANGE_WORDS = {'large': ('grows', 'gets bigger', 'swells'), 'small': ('shrinks', 'gets smaller')}
COLOUR_CHANGE_WORDS = ('turns {c}', 'changes to {c}', 'becomes {c}')
CAPTION_PREFIXES = ('', 'a video in which ', 'in this clip ', 'we see how ')
JOINERS = (' while ', ' as ', ' ; ')


class MovingObject(NamedTuple):
  shape: str
  colour: str  # At the first frame.
  size: str  # At the first frame.
  direction: str  # A key of DIRECTIONS, or STILL.
  speed: str  # SPEEDS, or STILL.
  end_colour: str  # At the last frame: differs from `colour` when the object changes colour.
  end_size: str
  start: tuple[float, float]  # (y, x) of the centre at the first frame, as shares of the frame.
  end: tuple[float, float]  # At the last frame (kept, not recomputed, so a reversal is exact).


class Clip(NamedTuple):
  objects: tuple[MovingObject, ...]
  reverse_of: int  # Index (in its split) of the clip this one reverses; -1 for a forward clip.


def reverse_object(obj: MovingObject) -> MovingObject:
  """The object played backwards: opposite direction and change, start and end exchanged."""
  return obj._replace(colour=obj.end_colour, end_colour=obj.colour, size=obj.end_size, end_size=obj.size,
                      direction=OPPOSITE.get(obj.direction, STILL), start=obj.end, end=obj.start)


def reverse_clip(objects: Sequence[MovingObject]) -> tuple[MovingObject, ...]:
  return tuple(reverse_object(o) for o in objects)


# What tells a clip from its reverse: an object's size or colour changes (so the first frame differs from the
# last even without motion), or only the motion does (its direction, which a model must see across frames).
REVERSAL_KINDS = ('motion', 'size', 'colour')


def reversal_kind(objects: Sequence[MovingObject]) -> str:
  """One of REVERSAL_KINDS (a clip has at most one change)."""
  if any(o.size != o.end_size for o in objects):
    return 'size'
  return 'colour' if any(o.colour != o.end_colour for o in objects) else 'motion'


def description(objects: Sequence[MovingObject]) -> str:
  """Canonical text of what the captions say, independent of object order and start positions."""
  return ';'.join(sorted(f'{o.shape}:{o.size}>{o.end_size}:{o.colour}>{o.end_colour}:{o.direction}:{o.speed}'
                         for o in objects))


def clip_key(objects: Sequence[MovingObject]) -> str:
  """The same for a clip and its reverse: the key of 'same clip' for splits and duplicates."""
  return min(description(objects), description(reverse_clip(objects)))


def split_of_clip(objects: Sequence[MovingObject]) -> str:
  bucket = int(hashlib.md5(('moving:' + clip_key(objects)).encode()).hexdigest(), 16) % 100
  return next(split for split, buckets in scenes.SPLIT_BUCKETS.items() if bucket in buckets)


def extent(obj: MovingObject) -> float:
  """Half the width of the object's largest box over the clip, as a share of the frame.

  A shape reaches 1.08 radii from its centre (the triangle's base); 1.1 keeps a margin."""
  return 1.1 * max(scenes.RADIUS_IN_CELLS[obj.size], scenes.RADIUS_IN_CELLS[obj.end_size]) / 3


def sample_description(rng: np.random.Generator) -> tuple[MovingObject, ...]:
  """Random objects and motions; their start and end positions are still to be placed (`place`)."""
  num_objects = 1 if rng.random() < ONE_OBJECT_PROB else 2
  moves = [True, rng.random() < BOTH_MOVE_PROB][:num_objects]
  changer = int(rng.integers(num_objects)) if rng.random() < CHANGE_PROB else -1
  change = ('size', 'colour')[rng.integers(2)] if changer >= 0 else STILL
  # Every colour of the clip differs (an end colour too), so each object is found by its colour.
  colours = [str(c) for c in rng.permutation(scenes.COLOURS)[:num_objects + (change == 'colour')]]
  objects = []
  for i in range(num_objects):
    shape, size = scenes.SHAPES[rng.integers(len(scenes.SHAPES))], scenes.SIZES[rng.integers(len(scenes.SIZES))]
    direction, speed = STILL, STILL
    if moves[i]:
      direction, speed = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))], SPEEDS[rng.integers(len(SPEEDS))]
    end_size = [s for s in scenes.SIZES if s != size][0] if i == changer and change == 'size' else size
    end_colour = colours[-1] if i == changer and change == 'colour' else colours[i]
    objects.append(MovingObject(shape, colours[i], size, direction, speed, end_colour, end_size, (0, 0), (0, 0)))
  return tuple(objects)


def _step(obj: MovingObject) -> np.ndarray:
  """(dy, dx) from the first frame's centre to the last's, as shares of the frame. float64 [2]."""
  if obj.direction == STILL:
    return np.zeros(2)
  return np.array(DIRECTIONS[obj.direction]) * DISTANCE[obj.speed] / np.hypot(*DIRECTIONS[obj.direction])


def place(objects: Sequence[MovingObject], rng: np.random.Generator) -> Optional[tuple[MovingObject, ...]]:
  """The objects at start positions that keep each path 0.5 px (at 32 px) inside the frame and the objects'
  boxes 1.5 px apart along their paths, or None when none of PLACEMENT_TRIES random draws does."""
  steps = [_step(o) for o in objects]
  margins = [extent(o) + 0.5 / 32 for o in objects]
  # [tries, 2] starts per object, all tries drawn at once.
  starts = [rng.uniform(m - np.minimum(s, 0), 1 - m - np.maximum(s, 0), size=(PLACEMENT_TRIES, 2))
            for m, s in zip(margins, steps)]
  ok = np.ones(PLACEMENT_TRIES, bool)
  # 17 points of the path: between two, objects (at most 28 px apart per clip) close in by < 0.9 px, so
  # every frame of any T keeps a gap of at least 0.6 px.
  along = np.linspace(0, 1, 17)[:, None, None]
  for i in range(len(objects)):
    for j in range(i + 1, len(objects)):
      offset = starts[i] - starts[j] + along * (steps[i] - steps[j])  # [17, tries, 2]
      ok &= np.abs(offset).max(-1).min(0) - extent(objects[i]) - extent(objects[j]) >= 1.5 / 32
  if not ok.any():
    return None
  first = int(np.argmax(ok))
  return tuple(o._replace(start=tuple(float(v) for v in start[first]),
                          end=tuple(float(v) for v in start[first] + step))
               for o, start, step in zip(objects, starts, steps))


def generate_clips(split: str, num_clips: int) -> list[Clip]:
  """`num_clips` clips of `split` with distinct descriptions, the same on every call.

  A reversed clip directly follows its forward clip; a shorter call gives a prefix of a longer one (the
  last forward clip may lose its reverse).
  """
  rng = np.random.default_rng(SPLIT_SEEDS[split])
  clips, seen = [], set()
  while len(clips) < num_clips:
    objects = sample_description(rng)
    with_reverse = rng.random() < REVERSE_PROB
    if split_of_clip(objects) != split or clip_key(objects) in seen:
      continue
    objects = place(objects, rng)  # After the cheap checks: most descriptions belong to another split.
    if objects is None:
      continue
    seen.add(clip_key(objects))
    clips.append(Clip(objects, -1))
    if with_reverse:
      clips.append(Clip(reverse_clip(objects), len(clips) - 1))
  return clips[:num_clips]


def render(objects: Sequence[MovingObject], num_frames: int, image_size: int,
           rng: np.random.Generator) -> np.ndarray:
  """Draws a clip: position, size and colour move linearly from the first frame to the last.

  Returns uint8 [num_frames, image_size, image_size, 3].
  """
  background = scenes.background(image_size, rng).astype(np.uint8)  # A still camera: one for every frame.
  along = np.linspace(0, 1, num_frames) if num_frames > 1 else np.zeros(1)
  video = np.repeat(background[None], num_frames, axis=0)  # [T, S, S, 3]
  yy, xx = np.mgrid[:image_size, :image_size] + 0.5
  column = lambda v: v[:, None, None]  # [T] -> [T, 1, 1], against the [S, S] pixel grid.
  for obj in objects:
    first = scenes.object_rgb(obj.colour, rng)
    last = scenes.object_rgb(obj.end_colour, rng) if obj.end_colour != obj.colour else first
    centre = (np.array(obj.start) + along[:, None] * (np.array(obj.end) - np.array(obj.start))) * image_size
    radius = (1 - along) * scenes.radius(obj.size, image_size) + along * scenes.radius(obj.end_size, image_size)
    mask = scenes.shape_mask(obj.shape, column(radius), yy - column(centre[:, 0]), xx - column(centre[:, 1]))
    rgb = ((1 - along)[:, None] * first + along[:, None] * last).astype(np.uint8)  # [T, 3]
    video[mask] = rgb[np.nonzero(mask)[0]]  # Each covered pixel gets its frame's colour.
  return video


def _object_phrase(obj: MovingObject, rng: np.random.Generator) -> str:
  pick = lambda options: options[rng.integers(len(options))]
  noun = (f'a {pick(scenes.SIZE_WORDS[obj.size])} {pick(scenes.COLOUR_WORDS[obj.colour])} '
          f'{pick(scenes.SHAPE_WORDS[obj.shape])}')
  if obj.direction == STILL:
    phrase = f'{noun} {pick(STILL_WORDS)}'
  else:
    verb, where, speed = pick(VERB_WORDS), pick(DIRECTION_WORDS[obj.direction]), pick(SPEED_WORDS[obj.speed])
    phrase = f'{noun} {verb} {where} {speed}' if rng.random() < 0.5 else f'{noun} {speed} {verb} {where}'
  if obj.end_size != obj.size:
    phrase += ' and ' + pick(SIZE_CHANGE_WORDS[obj.end_size])
  elif obj.end_colour != obj.colour:
    phrase += ' and ' + pick(COLOUR_CHANGE_WORDS).format(c=pick(scenes.COLOUR_WORDS[obj.end_colour]))
  return phrase


def make_captions(objects: Sequence[MovingObject], rng: np.random.Generator) -> list[str]:
  """NUM_CAPTIONS different paraphrases, each naming every object with its colour, size, motion and change."""
  captions = []
  while len(captions) < scenes.NUM_CAPTIONS:
    phrases = [_object_phrase(objects[i], rng) for i in rng.permutation(len(objects))]
    caption = CAPTION_PREFIXES[rng.integers(len(CAPTION_PREFIXES))] + JOINERS[rng.integers(len(JOINERS))].join(phrases)
    if caption not in captions:
      captions.append(caption)
  return captions


def captions_of(split: str, index: int, clip: Clip) -> list[str]:
  """The captions of clip `index` of `split` (those of `make_example`, without rendering the clip)."""
  return make_captions(clip.objects, np.random.default_rng([SPLIT_SEEDS[split], index, 1]))


def make_example(split: str, index: int, clip: Clip, num_frames: int, image_size: int) -> dict:
  """The video, captions and metadata of clip `index` of `split`, deterministic in (split, index).

  A reversed clip is its forward clip's rendering (same random draws) played backwards.
  """
  seed = SPLIT_SEEDS[split]
  if clip.reverse_of >= 0:
    forward = reverse_clip(clip.objects)  # Exact: reversal only exchanges fields.
    video = render(forward, num_frames, image_size, np.random.default_rng([seed, clip.reverse_of, 0]))[::-1]
  else:
    video = render(clip.objects, num_frames, image_size, np.random.default_rng([seed, index, 0]))
  return {
      'video': np.ascontiguousarray(video),
      'captions': captions_of(split, index, clip),
      'objects': object_features(clip.objects, image_size),
      'reverse_of': clip.reverse_of,
  }


def object_features(objects: Sequence[MovingObject], image_size: int) -> dict[str, list]:
  """The objects as the builder's 'objects' feature: class indices, and start and end centres in pixels."""
  return {
      'shape': [scenes.SHAPES.index(o.shape) for o in objects],
      'colour': [scenes.COLOURS.index(o.colour) for o in objects],
      'size': [scenes.SIZES.index(o.size) for o in objects],
      'end_colour': [scenes.COLOURS.index(o.end_colour) for o in objects],
      'end_size': [scenes.SIZES.index(o.end_size) for o in objects],
      'direction': [MOTION_DIRECTIONS.index(o.direction) for o in objects],
      'speed': [MOTION_SPEEDS.index(o.speed) for o in objects],
      'start': [np.float32(o.start) * image_size for o in objects],
      'end': [np.float32(o.end) * image_size for o in objects],
  }

