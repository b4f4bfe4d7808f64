"""The streamed training data of real image-caption sets (web shards, Flickr30K, COCO), and its saved position.

A training stream reads a source's examples (data/sources.py) in a deterministic, resumable order
(data/order.py), decodes and augments the images in worker threads (data/images.py), tokenises one caption
per image and yields batches in the pmap layout:

  {'image': uint8 [local_devices, per_device, S, S, 3], 'text': int32 [local_devices, per_device, L],
   'image_id': int32 [local_devices, per_device]}  (`image_id`: of the example's key, for image-id positives)

with a local batch of global_batch / jax.process_count(). Video examples (MSR-VTT) decode to clips of
`num_frames` frames (data/videos.py): their 'image' is uint8 [local_devices, per_device, T, S, S, 3]. The
order is a pure function of the seed and a position (epoch, group, offset), so `stream.get_state()` after
batch k-1 restores a stream whose batches are batches k, k+1, ... of the uninterrupted one:

- Each host reads its own shards (`webdataset.shards_for_host`).
- Each example's augmentation and caption choice draw from a generator seeded with its position, so they
  do not depend on which worker decodes it, or when.
- Skipped examples are counted (`stream.stats`, a `webdataset.ReadStats`) as their batches are consumed,
  not as they are read ahead, and the counts are part of the state, so a resumed run goes on counting.
  `webdataset.global_stats` sums them over hosts.
"""

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import multiprocessing
import queue
import threading
import zlib
from typing import Callable, Iterator, Optional, Sequence

import jax
import ml_collections
import numpy as np

from hivlp_jax import errors
from hivlp_jax import files
from hivlp_jax.data import images as images_lib
from hivlp_jax.data import order as order_lib
from hivlp_jax.data import sources
from hivlp_jax.data import tokenizer as tokenizer_lib
from hivlp_jax.data import videos
from hivlp_jax.data import webdataset

Position = order_lib.Position


def image_id(key: str) -> int:
  """A 31-bit id of an example's key (its image): equal keys, equal ids, on every host and run.

  CRC-32, not an index, so that hosts reading disjoint shards agree without a table. Among 30,000 keys about
  0.2 pairs collide on average (two such images count as one: a few wrong positives at most).
  """
  return zlib.crc32(key.encode()) & 0x7FFFFFFF


def _prepare(chunk: Sequence[tuple[sources.RawExample, tuple[int, ...]]], image_size: int,
             augment: images_lib.Augment, num_frames: int = 1) -> list[tuple[Optional[np.ndarray], Optional[str], str]]:
  """Worker task: [(image uint8 [S, S, 3] (a video's clip [num_frames, S, S, 3]) or None, caption or None,
  problem)] for (example, seed) pairs."""
  results = []
  for example, seed in chunk:
    if example.problem:
      results.append((None, None, example.problem))
      continue
    data = example.image
    if example.kind == 'video':  # A video file (MSR-VTT), decoded here in the worker.
      rng = np.random.default_rng(seed)
      caption = example.captions[int(rng.integers(len(example.captions)))]
      clip, problem = videos.read_clip(data, image_size, num_frames, rng, augment)
      results.append((clip, caption, problem))
      continue
    if isinstance(data, str):  # An image file (Karpathy layout), read here in the worker.
      data, problem = sources.read_image_file(data)
      if problem:
        results.append((None, None, problem))
        continue
    rng = np.random.default_rng(seed)
    caption = example.captions[int(rng.integers(len(example.captions)))]
    image = images_lib.decode_for_training(data, image_size, rng, augment)
    results.append((image, caption, '' if image is not None else 'corrupt_images'))
  return results


class TrainStream:
  """Iterator of training batches of a `Source`, decoded by workers and prefetched by a thread.

  Batches: {'image': uint8 [local_devices, per_device, S, S, 3], 'text': int32 [local_devices, per_device, L],
  'image_id': int32 [local_devices, per_device]},
  host arrays (or device arrays with `device_prefetch`). `get_state()` is the position after the last batch
  returned; `TrainStream(..., state=that)` continues with the next batch. `stats` counts the examples of
  the batches returned so far (with those of the run that saved `state`). Use as a context manager, or
  call `close()`, to stop the threads.

  transform(rng, batch) -> batch, when given, runs on each host batch ('image' [B, S, S, 3], 'text' [B, L];
  B the local batch) in the producer thread before the device split, e.g. masking; its generator is seeded
  by the batch's position, so a resumed stream repeats it.
  """

  def __init__(self, source: sources.Source, tokenizer: tokenizer_lib.Tokenizer, *, global_batch: int,
               image_size: int, max_len: int, seed: int, augment: images_lib.Augment = images_lib.Augment(),
               num_frames: int = 1, shards_per_group: int = 4, shuffle_buffer: int = 1000, num_workers: int = 4,
               worker_processes: bool = False, prefetch: int = 2, device_prefetch: int = 0,
               transform: Optional[Callable[[np.random.Generator, dict], dict]] = None,
               state: Optional[dict] = None, process_index: Optional[int] = None,
               process_count: Optional[int] = None, local_devices: Optional[int] = None):
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    self.local_devices = jax.local_device_count() if local_devices is None else local_devices
    if global_batch % self.process_count or (global_batch // self.process_count) % self.local_devices:
      raise errors.InputError(f'Global batch {global_batch} does not split into {self.process_count} hosts x '
                              f'{self.local_devices} local devices.')
    self.local_batch = global_batch // self.process_count
    self.source, self.tokenizer, self.seed = source, tokenizer, seed
    self.shards = webdataset.shards_for_host(source.shards, self.process_index, self.process_count)
    self.image_size, self.max_len, self.augment = image_size, max_len, augment
    self.num_frames = num_frames  # Frames per clip of video examples.
    self.shards_per_group, self.shuffle_buffer = shards_per_group, shuffle_buffer
    self.transform = transform
    self._position = self._check_state(state) if state else Position()
    # A state saved before the counts were part of it starts them at 0.
    self.stats = webdataset.ReadStats.from_dict((state or {}).get('stats', {}))
    self._skip_log = sources.SkipLog(f'Training data of {source.name} (host {self.process_index})')
    self._device_prefetch = device_prefetch
    self._on_device = collections.deque()
    self._num_workers = num_workers
    if num_workers <= 0:
      self._executor = None
    elif worker_processes:
      # spawn, not fork: the parent runs JAX and TF threads, which fork would copy mid-flight.
      self._executor = concurrent.futures.ProcessPoolExecutor(num_workers,
                                                              mp_context=multiprocessing.get_context('spawn'))
    else:
      self._executor = concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix='decode')
    self._queue = queue.Queue(maxsize=max(prefetch, 1))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._produce, args=(dataclasses.replace(self.stats),),
                                    name='batches', daemon=True)
    self._thread.start()

  # -- State.

  def get_state(self) -> dict:
    """A small JSON-able dict: the position after the last batch returned, what it is valid for, the counts."""
    return dict(dataclasses.asdict(self._position), seed=self.seed, process_index=self.process_index,
                process_count=self.process_count, num_shards=len(self.shards), source=self.source.name,
                stats=self.stats.as_dict())

  def _check_state(self, state: dict) -> Position:
    expected = {'seed': self.seed, 'process_index': self.process_index, 'process_count': self.process_count,
                'num_shards': len(self.shards), 'source': self.source.name}
    changed = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
    if changed:
      raise errors.InputError(f'The data state {state} was taken from another stream; changed (saved, now): {changed}. '
                              'A resumed run needs the same seed, hosts and shards to continue the data order.')
    return Position(int(state['epoch']), int(state['group']), int(state['offset']))

  # -- Producer.

  def _produce(self, stats: webdataset.ReadStats):
    try:
      for item in self._batches(stats):
        if not self._put(item):
          return
    except BaseException as e:  # pylint: disable=broad-except  (re-raised in the consumer)
      self._put(e)

  def _put(self, item) -> bool:
    """Puts `item` in the queue unless the stream is closed first; returns whether it did."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def _decoded(self) -> Iterator[tuple[tuple, sources.RawExample, Position]]:
    """(worker result, example, position) in stream order; up to a window of chunks decoded ahead."""
    examples = order_lib.ordered_examples(self.source, self.shards, self.seed, self.process_index,
                                          self._position, self.shards_per_group, self.shuffle_buffer)

    def make_chunks(size=8):  # Tasks of a few examples: fewer futures, and fewer round trips to processes.
      while True:
        chunk = list(itertools.islice(examples, size))
        # Each example's generator is seeded with its position: the same draws whichever worker runs it.
        yield [(e, (self.seed, self.process_index, p.epoch, p.group, p.offset)) for e, p in chunk], chunk

    prepare = functools.partial(_prepare, image_size=self.image_size, augment=self.augment,
                                num_frames=self.num_frames)
    chunks = make_chunks()
    if self._executor is None:
      for tasks, chunk in chunks:
        yield from ((result, e, p) for result, (e, p) in zip(prepare(tasks), chunk))
      return
    pending = collections.deque()
    for tasks, chunk in chunks:
      pending.append((self._executor.submit(prepare, tasks), chunk))
      if len(pending) >= 4 * self._num_workers:
        future, chunk = pending.popleft()
        yield from ((result, e, p) for result, (e, p) in zip(future.result(), chunk))
        if self._stop.is_set():
          return

  def _batches(self, stats: webdataset.ReadStats) -> Iterator[tuple]:
    """(batch, its end position, the counts up to it, the skips to name [(problem, description)])."""
    images, captions, ids, named = [], [], [], []
    last_good_epoch = self._position.epoch
    for (image, caption, problem), example, position in self._decoded():
      if problem:
        stats.count(problem)
        if self._skip_log.take(problem):
          named.append((problem, example.describe()))
        if position.epoch > last_good_epoch + 1:
          raise errors.RunStateError(f'A whole epoch of {len(self.shards)} shards of {self.source.name} gave no usable '
                                     f'example on host {self.process_index}: {webdataset.count_by_reason(stats)}; '
                                     f'e.g. {[description for _, description in named[-3:]]}.')
        continue
      stats.samples += 1
      last_good_epoch = position.epoch
      images.append(image)
      captions.append(caption)
      ids.append(image_id(example.key))
      if len(images) == self.local_batch:
        batch = {'image': np.stack(images), 'text': self.tokenizer.encode(captions, self.max_len),
                 'image_id': np.asarray(ids, np.int32)}
        end = Position(position.epoch, position.group, position.offset + 1)
        if self.transform is not None:  # Seeded by the batch's end position, unique in the stream.
          batch = self.transform(np.random.default_rng([self.seed, self.process_index, *dataclasses.astuple(end), 1]),
                                 batch)
        batch = {k: v.reshape((self.local_devices, -1) + v.shape[1:]) for k, v in batch.items()}
        yield batch, end, dataclasses.replace(stats), named
        images, captions, ids, named = [], [], [], []

  # -- Consumer.

  def _next_host_batch(self) -> tuple:
    if self._stop.is_set():
      raise RuntimeError('This stream is closed; create another from its get_state().')
    item = self._queue.get()
    if isinstance(item, BaseException):
      self.close()
      raise item
    return item

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if not self._device_prefetch:
      batch, self._position, self.stats, named = self._next_host_batch()
    else:
      # As flax.jax_utils.prefetch_to_device, keeping each batch's position and counts beside it.
      while len(self._on_device) < self._device_prefetch:
        batch, *rest = self._next_host_batch()
        self._on_device.append((_to_devices(batch), *rest))
      batch, self._position, self.stats, named = self._on_device.popleft()
    for problem, description in named:
      self._skip_log.log(problem, description)
    return batch

  def close(self):
    self._stop.set()
    while self._thread.is_alive():
      try:
        self._queue.get(timeout=0.1)
      except queue.Empty:
        pass
    if self._executor is not None:
      self._executor.shutdown(wait=True, cancel_futures=True)

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
                        state: Optional[dict] = None,
                        transform: Optional[Callable[[np.random.Generator, dict], dict]] = None) -> TrainStream:
  """The training stream that config.data describes, from the start or from `get_state()` of an earlier one."""
  data = config.data
  return TrainStream(
      sources.source_from_config(config, 'train'), tokenizer, global_batch=config.batch_size,
      image_size=config.model.image_size, max_len=config.model.text.max_len, seed=config.seed,
      augment=images_lib.Augment(tuple(data.crop_scale), tuple(data.crop_ratio), data.flip),
      num_frames=config.model.video.num_frames,
      shards_per_group=data.shards_per_group,
      shuffle_buffer=data.shuffle_buffer, num_workers=data.num_workers, worker_processes=data.worker_processes,
      prefetch=data.prefetch, device_prefetch=data.device_prefetch, transform=transform, state=state)


# Data state files beside checkpoints: one per host, since each host has its own position.


def state_file(directory: str, step: int, process_index: Optional[int] = None) -> str:
  process_index = jax.process_index() if process_index is None else process_index
  return str(files.path(directory) / f'data_state_{step}_{process_index}.json')


def write_state(directory: str, step: int, state: dict) -> str:
  """Writes `state` as the data state of `step` for this host (atomically where the filesystem allows)."""
  path = state_file(directory, step, state.get('process_index'))
  files.write_json(path, state)
  return path


def read_state(directory: str, step: int) -> Optional[dict]:
  """This host's data state of `step`, or None when there is none (start the stream afresh)."""
  path = state_file(directory, step)
  return files.read_json(path) if files.path(path).exists() else None
