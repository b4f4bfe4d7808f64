"""The streamed training data of real image-caption sets (web shards, Flickr30K, COCO, MSR-VTT), read by grain.

A source (data/sources.py) is a random-access sequence of undecoded examples. grain orders it: each host
takes every process_count-th example, shuffles them globally with a new permutation each epoch, and repeats
them forever. Each example is decoded and augmented (data/images.py; a clip of `num_frames` frames with
data/videos.py) with a generator that grain seeds by the example's index, so the draws do not depend on which
thread or process decodes it. Batches of usable examples are tokenised and laid out for pmap:

  {'image': uint8 [local_devices, per_device, S, S, 3] (clips: [local_devices, per_device, T, S, S, 3]),
   'text': int32 [local_devices, per_device, L],
   'image_id': int32 [local_devices, per_device]}  (`image_id`: of the example's key, for image-id positives)

with a local batch of global_batch / jax.process_count(). Unusable examples are skipped, counted
(`stream.stats`, a `webdataset.ReadStats`, summed over hosts by `webdataset.global_stats`) and the first ones
named in the log. `stream.get_state()` after batch k is grain's iterator state with the counts, as JSON; a
stream created with it yields batches k+1, k+2, ... of the uninterrupted one, bit for bit. Training saves it
in the same orbax checkpoint as the model (checkpointing.py).
"""

import collections
import dataclasses
import zlib
from typing import Callable, Optional

from absl import flags
import grain
import jax
import ml_collections
import numpy as np

from hivlp_jax import errors
from hivlp_jax.data import images as images_lib
from hivlp_jax.data import sources
from hivlp_jax.data import tokenizer as tokenizer_lib
from hivlp_jax.data import videos
from hivlp_jax.data import webdataset

Transform = Callable[[np.random.Generator, dict], dict]


def image_id(key: str) -> int:
  """A 31-bit id of an example's key (its image): equal keys, equal ids, on every host and run.

  CRC-32, not an index, so that hosts agree without a table. Among 30,000 keys about 0.2 pairs collide on
  average (two such images count as one: a few wrong positives at most).
  """
  return zlib.crc32(key.encode()) & 0x7FFFFFFF


@dataclasses.dataclass(frozen=True)
class _Decode:
  """grain's random map: RawExample -> {'image': uint8 [S, S, 3] ([T, S, S, 3] for a clip) or None, 'caption',
  'key', 'problem' ('' or the ReadStats field that counts it), 'where' (to name it), 'seed'}."""
  image_size: int
  augment: images_lib.Augment
  num_frames: int

  def __call__(self, example: sources.RawExample, rng: np.random.Generator) -> dict:
    seed = int(rng.integers(1 << 62))  # Seeds the batch transform when this example is first in its batch.
    image, caption, problem = None, None, example.problem
    if not problem:
      caption = example.captions[int(rng.integers(len(example.captions)))]
      if example.kind == 'video':  # A video file (MSR-VTT), decoded here in the worker.
        image, problem = videos.read_clip(example.image, self.image_size, self.num_frames, rng, self.augment)
      else:
        data = example.image
        if isinstance(data, str):  # An image file (Karpathy layout), read here in the worker.
          data, problem = sources.read_image_file(data)
        if not problem:
          image = images_lib.decode_for_training(data, self.image_size, rng, self.augment)
          problem = '' if image is not None else 'corrupt_images'
    return {'image': image, 'caption': caption, 'key': example.key, 'problem': problem,
            'where': example.describe() if problem else '', 'seed': seed}


@dataclasses.dataclass(frozen=True)
class _BatchSpec:
  size: int  # The local batch.
  local_devices: int
  tokenizer: tokenizer_lib.Tokenizer
  max_len: int
  transform: Optional[Transform]
  give_up_after: int  # Unusable examples in a row (a whole epoch of the host's share) before giving up.
  name: str


class _Batches(grain.IterDataset):
  """Decoded examples -> {'batch': the pmap-layout batch of `spec.size` usable ones, 'skipped': {problem: count},
  'named': [(problem, where)] of the first skipped ones}."""

  def __init__(self, parent: grain.IterDataset, spec: _BatchSpec):
    super().__init__(parent)
    self.spec = spec

  def __iter__(self):
    return _BatchIterator(self._parent.__iter__(), self.spec)


class _BatchIterator(grain.DatasetIterator):
  """Its state is its parent's: a batch is complete when returned, so nothing is held between batches."""

  def __init__(self, parent: grain.DatasetIterator, spec: _BatchSpec):
    super().__init__(parent)
    self.spec = spec

  def __next__(self) -> dict:
    spec = self.spec
    kept, skipped, named, in_a_row = [], collections.Counter(), [], 0
    while len(kept) < spec.size:
      example = next(self._parent)
      if not example['problem']:
        kept.append(example)
        in_a_row = 0
        continue
      skipped[example['problem']] += 1
      named.append((example['problem'], example['where']))
      in_a_row += 1
      if in_a_row > spec.give_up_after:
        raise errors.RunStateError(
            f'A whole epoch of the {spec.give_up_after} examples of {spec.name} on this host gave no usable '
            f'example: skipped {dict(skipped)}; e.g. {[where for _, where in named[-3:]]}.')
    batch = {'image': np.stack([e['image'] for e in kept]),
             'text': spec.tokenizer.encode([e['caption'] for e in kept], spec.max_len),
             'image_id': np.asarray([image_id(e['key']) for e in kept], np.int32)}
    if spec.transform is not None:  # E.g. masking; seeded by the batch's first example, as grain seeded it.
      batch = spec.transform(np.random.default_rng(kept[0]['seed']), batch)
    batch = {k: v.reshape((spec.local_devices, -1) + v.shape[1:]) for k, v in batch.items()}
    return {'batch': batch, 'skipped': dict(skipped), 'named': named[:10]}

  def get_state(self) -> dict:
    return self._parent.get_state()

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state)


class TrainStream:
  """Iterator of training batches of a `Source` (the module docstring has the layout and the order).

  Batches are host arrays, or device arrays with `device_prefetch`. `get_state()` is the state after the last
  batch returned; `TrainStream(..., state=that)` continues with the next one. `stats` counts the examples of
  the batches returned so far (with those of the run that saved `state`). Use as a context manager, or call
  `close()`, to stop grain's threads and processes.

  num_workers: decode threads (per worker process). worker_processes: grain worker processes (0: none); each
  decodes a share of the order, so the order depends on their number, and a resumed run must keep it.
  transform(rng, batch) -> batch, when given, runs on each host batch ('image' [B, ...], 'text' [B, L]) before
  the device split, e.g. masking, in the workers; its generator is seeded by the batch's first example.
  """

  def __init__(self, source: sources.Source, tokenizer: tokenizer_lib.Tokenizer, *, global_batch: int,
               image_size: int, max_len: int, seed: int, augment: images_lib.Augment = images_lib.Augment(),
               num_frames: int = 1, num_workers: int = 4, worker_processes: int = 0, prefetch: int = 2,
               device_prefetch: int = 0, transform: Optional[Transform] = None, state: Optional[dict] = None,
               process_index: Optional[int] = None, process_count: Optional[int] = None,
               local_devices: Optional[int] = None):
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    self.local_devices = jax.local_device_count() if local_devices is None else local_devices
    if global_batch % self.process_count or (global_batch // self.process_count) % self.local_devices:
      raise errors.InputError(f'Global batch {global_batch} does not split into {self.process_count} hosts x '
                              f'{self.local_devices} local devices.')
    self.local_batch = global_batch // self.process_count
    self.source, self.seed, self.worker_processes = source, seed, int(worker_processes)
    share = grain.MapDataset.source(source.examples)[self.process_index::self.process_count]
    if not len(share):
      raise errors.RunStateError(f'{source.name} has {len(source.examples)} examples: none for host '
                                 f'{self.process_index} of {self.process_count}.')
    self._identity = {'seed': seed, 'process_index': self.process_index, 'process_count': self.process_count,
                      'num_examples': len(source.examples), 'source': source.name,
                      'worker_processes': self.worker_processes}
    if state:
      self._check_state(state)
    self.stats = webdataset.ReadStats.from_dict((state or {}).get('stats', {}))
    self._skip_log = sources.SkipLog(f'Training data of {source.name} (host {self.process_index})')
    shuffle_seed, decode_seed = np.random.SeedSequence([seed, self.process_index]).generate_state(2)
    ordered = share.shuffle(seed=int(shuffle_seed)).random_map(
        _Decode(image_size, augment, num_frames), seed=int(decode_seed)).repeat()
    # Decoded examples read ahead: a whole batch, so the threads keep decoding while a batch is stacked.
    read_options = grain.ReadOptions(num_threads=num_workers,
                                     prefetch_buffer_size=max(4 * num_workers, self.local_batch))
    batches = _Batches(ordered.to_iter_dataset(read_options),
                       _BatchSpec(self.local_batch, self.local_devices, tokenizer, max_len, transform,
                                  give_up_after=len(share), name=source.name))
    if self.worker_processes:
      if not flags.FLAGS.is_parsed():  # grain's workers read its flags; a library caller may not have parsed any.
        flags.FLAGS.mark_as_parsed()
      batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_processes,
                                                                 per_worker_buffer_size=max(prefetch, 1)))
    else:
      batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=max(prefetch, 1))
    self._iterator = iter(batches)
    if state:
      self._iterator.set_state(state['grain'])
    self._state = self._state_after(self.stats)
    self._device_prefetch = device_prefetch
    self._on_device = collections.deque()
    self._closed = False

  # -- State.

  def _state_after(self, stats: webdataset.ReadStats) -> dict:
    """The state now (grain's, after the last batch taken from it), with `stats` as its counts."""
    return dict(self._identity, grain=self._iterator.get_state(), stats=stats.as_dict())

  def get_state(self) -> dict:
    """A JSON-able dict: grain's state after the last batch returned, what it is valid for, the counts."""
    return self._state

  def _check_state(self, state: dict) -> None:
    changed = {k: (state.get(k), v) for k, v in self._identity.items() if state.get(k) != v}
    if changed or 'grain' not in state:
      raise errors.InputError(
          f'The saved data state was taken from another stream; changed (saved, now): {changed or "its format"}. '
          'A resumed run needs the same seed, hosts, data and config.data.worker_processes to continue the data '
          'order: restore them, or start a new --workdir.')

  # -- Iteration.

  def _next_host_batch(self) -> tuple:
    """(batch, the state after it, the counts up to it, the skips to name)."""
    if self._closed:
      raise RuntimeError('This stream is closed; create another from its get_state().')
    item = next(self._iterator)
    stats = dataclasses.replace(self.stats if not self._on_device else self._on_device[-1][2])
    stats.samples += self.local_batch
    for problem, count in item['skipped'].items():
      setattr(stats, problem, getattr(stats, problem) + count)
    return item['batch'], self._state_after(stats), stats, item['named']

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if not self._device_prefetch:
      batch, self._state, self.stats, named = self._next_host_batch()
    else:
      # As flax.jax_utils.prefetch_to_device, keeping each batch's state and counts beside it.
      while len(self._on_device) < self._device_prefetch:
        batch, *rest = self._next_host_batch()
        self._on_device.append((_to_devices(batch), *rest))
      batch, self._state, self.stats, named = self._on_device.popleft()
    for problem, where in named:
      if self._skip_log.take(problem):
        self._skip_log.log(problem, where)
    return batch

  def close(self):
    if not self._closed:
      self._closed = True
      self._on_device.clear()
      close = getattr(self._iterator, 'close', None)
      if close is not None:
        close()
      self._iterator = None  # Collected now: grain's iterators log errors when collected at interpreter exit.

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _to_devices(batch: dict) -> dict:
  """Host batch [local_devices, ...] -> one array sharded over the local devices along axis 0 (pmap's)."""
  devices = jax.local_devices()
  mesh = jax.sharding.Mesh(np.array(devices), ('batch',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('batch'))
  return jax.tree.map(lambda x: jax.device_put(x, sharding), batch)


def create_train_stream(config: ml_collections.ConfigDict, tokenizer: tokenizer_lib.Tokenizer,
                        state: Optional[dict] = None, transform: Optional[Transform] = None) -> TrainStream:
  """The training stream that config.data describes, from the start or from `get_state()` of an earlier one."""
  data = config.data
  return TrainStream(
      sources.source_from_config(config, 'train'), tokenizer, global_batch=config.batch_size,
      image_size=config.model.image_size, max_len=config.model.text.max_len, seed=config.seed,
      augment=images_lib.Augment(tuple(data.crop_scale), tuple(data.crop_ratio), data.flip),
      num_frames=config.model.video.num_frames, num_workers=data.num_workers,
      worker_processes=data.worker_processes, prefetch=data.prefetch, device_prefetch=data.device_prefetch,
      transform=transform, state=state)
