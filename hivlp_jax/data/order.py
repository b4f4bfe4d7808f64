"""The streamed training order: a pure function of (seed, host, position).

Every epoch permutes the host's shards with the seed. A sequential source (tar files, TFDS files) reads them
in groups of `shards_per_group`, interleaved round-robin and mixed by a shuffle buffer that empties at the
end of each group; so a resume replays at most one group of undecoded bytes. A random-access source
(Karpathy JSON + image files) is one group whose order is a permutation of all its examples.
"""

import collections
import dataclasses
import itertools
from typing import Any, Iterator, Sequence

import numpy as np

from hivlp_jax import errors
from hivlp_jax.data import sources


def _interleave(iterators: Sequence[Iterator]) -> Iterator:
  """Round-robin over iterators until all are exhausted."""
  active = collections.deque(iterators)
  while active:
    iterator = active.popleft()
    for item in itertools.islice(iterator, 1):
      yield item
      active.append(iterator)


def _shuffle_buffer(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
  """Emits a random element of a `size`-element buffer for each new item, then the rest in random order."""
  buffer = []
  draws = iter(())
  for item in items:
    if len(buffer) < size:
      buffer.append(item)
      continue
    j = next(draws, None)
    if j is None:  # Draw in blocks: one numpy call per 1024 items.
      draws = iter(rng.integers(0, size, 1024).tolist())
      j = next(draws)
    yield buffer[j]
    buffer[j] = item
  for j in rng.permutation(len(buffer)):
    yield buffer[j]


@dataclasses.dataclass(frozen=True)
class Position:
  """Where a stream is: `offset` examples of group `group` of epoch `epoch` consumed."""
  epoch: int = 0
  group: int = 0
  offset: int = 0


def ordered_examples(source: sources.Source, shards: Sequence[Any], seed: int, process_index: int,
                     start: Position, shards_per_group: int, shuffle_buffer: int
                     ) -> Iterator[tuple[sources.RawExample, Position]]:
  """Yields (example, its position) from `start` on, forever: the host's order of `source`.

  Position(e, g, i) is example i of group g of epoch e; a stream resumed at the position after an example
  continues with the next one.
  """
  epoch, group, offset = start.epoch, start.group, start.offset
  while True:
    whole_epoch, count = group == 0 and offset == 0, 0
    order = np.random.default_rng([seed, process_index, epoch]).permutation(len(shards))
    per_group = len(shards) if source.random_access or shards_per_group <= 0 else shards_per_group
    groups = [order[i:i + per_group] for i in range(0, len(order), per_group)]
    for g in range(group, len(groups)):
      if source.random_access:
        examples = (shards[i] for i in groups[g])  # Already a permutation of all the host's examples.
      else:
        examples = _interleave([source.read(shards[i]) for i in groups[g]])
        if shuffle_buffer > 1:
          examples = _shuffle_buffer(examples, shuffle_buffer,
                                     np.random.default_rng([seed, process_index, epoch, g, 1]))
      for index, example in enumerate(itertools.islice(examples, offset, None), start=offset):
        yield example, Position(epoch, g, index)
        count += 1
      offset = 0
    if whole_epoch and not count:
      raise errors.RunStateError(f'The {len(shards)} shards of {source.name} of host {process_index} hold no examples.')
    epoch, group = epoch + 1, 0

