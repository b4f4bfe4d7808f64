"""The hard embedded scenes: families of near-duplicate scenes, so a bag-of-attributes model fails.

Objects are those of `scenes.py` (shape, colour, size, cell on the 3x3 grid), 2 to 5 per scene, on a
background with grey clutter strokes that no caption mentions. Every split is made of *families*: a base
scene and `family_size - 1` single edits of it. An edit changes exactly one thing:
  colour / shape / size: one attribute of one object;
  move:   one object goes to an empty cell;
  swap:   two objects exchange cells. One relation flips ("the circle left of the square" becomes the
          square left of the circle) and the caption's bag of words stays the same;
  add / remove: one object more or fewer (the count changes).
So every edited scene differs from another scene of its split (its base) by one attribute, one relation
or one object, and a retrieval model must bind attributes to objects to rank it apart from its base.

A scene's split is a hash of its bag of attributes and its bag of cells, which a swap leaves unchanged:
swapped scenes always stay in their base's split, and splits never share a scene (nor a bag).
Captions are the default's paraphrases (every object with all four attributes), some prefixed with the
object count. Everything is a deterministic function of (split, index).
"""

import dataclasses
import hashlib
from typing import NamedTuple, Optional, Sequence

import numpy as np

from hivlp_jax.data import scenes

SceneObject = scenes.SceneObject
EDIT_KINDS = ('colour', 'shape', 'size', 'move', 'swap', 'add', 'remove')
NUMBER_WORDS = {1: 'one', 2: 'two', 3: 'three', 4: 'four', 5: 'five'}
# Seeds of their own, so no hard scene draws the random numbers of a default one.
SPLIT_SEEDS = {'train': 100, 'validation': 101, 'test': 102}
# Tries of one edit kind on a base before the next kind (rare kinds, e.g. size on a 2-object scene in the
# 10% test share, often have no edit in the split).
TRIES_PER_KIND = 30


@dataclasses.dataclass(frozen=True)
class Spec:
  """How hard scenes are drawn (a field of the TFDS builder config)."""
  family_size: int = 16  # A base scene and family_size - 1 single edits of it.
  min_objects: int = 2
  max_objects: int = 5  # At most 9: one object per cell.
  object_probs: tuple[float, ...] = (0.1, 0.3, 0.3, 0.3)  # Of min_objects .. max_objects objects.
  max_clutter: int = 6  # Grey strokes per image: uniform in [max_clutter // 2, max_clutter].


class Member(NamedTuple):
  objects: list[SceneObject]
  family: int  # Index of the family within its split.
  edit: str  # 'base', or the kind of edit that made it from its family's base (EDIT_KINDS).


def bag_key(objects: Sequence[SceneObject]) -> str:
  """The scene with its bindings forgotten: its objects' attributes and its cells, each sorted."""
  attributes = sorted(f'{o.size}:{o.colour}:{o.shape}' for o in objects)
  return ';'.join(attributes) + '|' + ','.join(str(c) for c in sorted(o.cell for o in objects))


def split_of_scene(objects: Sequence[SceneObject]) -> str:
  bucket = int(hashlib.md5(('hard:' + bag_key(objects)).encode()).hexdigest(), 16) % 100
  return next(split for split, buckets in scenes.SPLIT_BUCKETS.items() if bucket in buckets)


def sample_scene(spec: Spec, rng: np.random.Generator) -> list[SceneObject]:
  num_objects = rng.choice(np.arange(spec.min_objects, spec.max_objects + 1), p=spec.object_probs)
  cells = rng.choice(len(scenes.CELLS), size=num_objects, replace=False)
  return [scenes.random_object(int(c), rng) for c in sorted(cells)]


def _other(values: Sequence[str], value: str, rng: np.random.Generator) -> str:
  choices = [v for v in values if v != value]
  return choices[rng.integers(len(choices))]


def edit_scene(objects: Sequence[SceneObject], kind: str, spec: Spec,
               rng: np.random.Generator) -> Optional[list[SceneObject]]:
  """One edit of `kind` (EDIT_KINDS) of the scene, or None where the scene allows none."""
  objects = list(objects)
  i = int(rng.integers(len(objects)))
  free = sorted(set(range(len(scenes.CELLS))) - {o.cell for o in objects})
  if kind == 'colour':
    objects[i] = objects[i]._replace(colour=_other(scenes.COLOURS, objects[i].colour, rng))
  elif kind == 'shape':
    objects[i] = objects[i]._replace(shape=_other(scenes.SHAPES, objects[i].shape, rng))
  elif kind == 'size':
    objects[i] = objects[i]._replace(size=_other(scenes.SIZES, objects[i].size, rng))
  elif kind == 'move':
    if not free:
      return None
    objects[i] = objects[i]._replace(cell=free[rng.integers(len(free))])
  elif kind == 'swap':
    # Two objects that look different: swapping twins would give the same scene.
    pairs = [(a, b) for a in range(len(objects)) for b in range(a + 1, len(objects))
             if objects[a][:3] != objects[b][:3]]
    if not pairs:
      return None
    a, b = pairs[rng.integers(len(pairs))]
    objects[a], objects[b] = objects[a]._replace(cell=objects[b].cell), objects[b]._replace(cell=objects[a].cell)
  elif kind == 'add':
    if len(objects) >= spec.max_objects or not free:
      return None
    objects.append(scenes.random_object(free[rng.integers(len(free))], rng))
  elif kind == 'remove':
    if len(objects) <= spec.min_objects:
      return None
    del objects[i]
  else:
    raise ValueError(f'Unknown edit kind {kind!r}; expected one of {EDIT_KINDS}.')
  return sorted(objects, key=lambda o: o.cell)


def difference(a: Sequence[SceneObject], b: Sequence[SceneObject]) -> Optional[str]:
  """The kind of the single edit that turns scene `a` into scene `b` (EDIT_KINDS), or None if there is none.

  Found from the two scenes alone (not from how they were made), so tests can check the families with it.
  """
  a_set, b_set = set(a), set(b)
  if len(b) == len(a) + 1 and a_set < b_set:
    return 'add'
  if len(b) == len(a) - 1 and b_set < a_set:
    return 'remove'
  if len(a) != len(b) or len(a_set) != len(a) or len(b_set) != len(b):
    return None
  only_a, only_b = sorted(a_set - b_set), sorted(b_set - a_set)
  if len(only_a) == 1:
    (x,), (y,) = only_a, only_b
    changed = [f for f in ('shape', 'colour', 'size', 'cell') if getattr(x, f) != getattr(y, f)]
    if len(changed) == 1:
      return 'move' if changed == ['cell'] else changed[0]
    return None
  if len(only_a) == 2:
    x, y = only_a
    if {x._replace(cell=y.cell), y._replace(cell=x.cell)} == set(only_b):
      return 'swap'
  return None


def generate_families(split: str, num_scenes: int, spec: Spec) -> list[Member]:
  """`num_scenes` distinct scenes of `split` in families (consecutive), the same on every call.

  The last family is cut short when `num_scenes` is not a multiple of `spec.family_size`.
  """
  rng = np.random.default_rng(SPLIT_SEEDS[split])
  members, seen = [], set()
  while len(members) < num_scenes:
    base = sample_scene(spec, rng)
    if split_of_scene(base) != split or scenes.scene_key(base) in seen:
      continue
    family = [base]
    keys = {scenes.scene_key(base)}
    # Each kind in turn (a fresh order per family), so a family holds as many kinds as its split allows.
    for kind in list(rng.permutation(EDIT_KINDS)) * spec.family_size:
      if len(family) == spec.family_size:
        break
      for _ in range(TRIES_PER_KIND):
        edited = edit_scene(base, str(kind), spec, rng)
        if edited is None:
          break
        key = scenes.scene_key(edited)
        if split_of_scene(edited) == split and key not in seen and key not in keys:
          family.append(edited)
          keys.add(key)
          break
    if len(family) < spec.family_size:
      continue  # A base with too few edits in its split: every family has the same size.
    seen |= keys
    index = len(members) // spec.family_size
    members += [Member(objects, index, 'base' if j == 0 else difference(base, objects))
                for j, objects in enumerate(family)]
  return members[:num_scenes]


def draw_clutter(image: np.ndarray, spec: Spec, rng: np.random.Generator) -> None:
  """Grey strokes, 1 px wide and 3 to 7 px long, anywhere on `image` [S, S, 3], in place.

  Dull grey (60-110) is far from every object colour, so clutter never reads as an object.
  """
  size = image.shape[0]
  for _ in range(rng.integers(spec.max_clutter // 2, spec.max_clutter + 1)):
    start = rng.uniform(0, size, size=2)
    angle, length = rng.uniform(0, np.pi), rng.uniform(3, 7)
    steps = np.linspace(0, length, int(2 * length) + 1)[:, None]
    points = (start + steps * np.array([np.sin(angle), np.cos(angle)])).astype(int)
    points = points[(points >= 0).all(1) & (points < size).all(1)]
    image[points[:, 0], points[:, 1]] = rng.uniform(60, 110)


def render(objects: Sequence[SceneObject], image_size: int, spec: Spec,
           rng: np.random.Generator) -> np.ndarray:
  """Background, clutter, then the objects on top. Returns uint8 [image_size, image_size, 3]."""
  image = scenes.background(image_size, rng)
  draw_clutter(image, spec, rng)
  for obj in objects:
    scenes.draw_object(image, obj, rng)
  return image.astype(np.uint8)


def caption_prefixes(num_objects: int) -> tuple[str, ...]:
  """The default's prefixes and two that state the count."""
  count = NUMBER_WORDS[num_objects]
  return scenes.CAPTION_PREFIXES + (f'{count} shapes : ', f'a picture of {count} shapes : ')


def make_example(split: str, index: int, member: Member, image_size: int, spec: Spec) -> dict:
  """The image, captions and family of scene `index` of `split`, deterministic in (split, index)."""
  rng = np.random.default_rng([SPLIT_SEEDS[split], index])
  objects = member.objects
  return {
      'image': render(objects, image_size, spec, rng),
      'captions': scenes.make_captions(objects, rng, caption_prefixes(len(objects))),
      'objects': scenes.object_features(objects),
      'family': member.family,
      'edit': member.edit,
  }
