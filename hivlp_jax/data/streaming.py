"""Streaming input pipeline for real image-caption data: web shards, Flickr30K and COCO.

A training stream reads a source's examples in a deterministic, resumable order, decodes and augments the
images in worker threads, tokenises one caption per image and yields batches in the pmap layout:

  {'image': uint8 [local_devices, per_device, S, S, 3], 'text': int32 [local_devices, per_device, L]}

with a local batch of global_batch / jax.process_count(). The order is a pure function of the seed and a
position (epoch, group, offset), so `stream.get_state()` after batch k-1 restores a stream whose batches
are batches k, k+1, ... of the uninterrupted one:

- Each host reads its own shards (`webdataset.shards_for_host`).
- Every epoch permutes the host's shards with the seed. A sequential source (tar files, TFDS files) reads
  them in groups of `shards_per_group`, interleaved round-robin and mixed by a shuffle buffer that empties
  at the end of each group; so a resume replays at most one group of undecoded bytes. A random-access
  source (Karpathy JSON + image files) is one group whose order is a permutation of all its examples.
- Each example's augmentation and caption choice draw from a generator seeded with its position, so they
  do not depend on which worker decodes it, or when.

Images are decoded and transformed with PIL, which releases the GIL in JPEG decoding and resizing. On a
~450 px JPEG, decoding + crop + resize to 224 px took 3.0-4.3 ms on one thread of a busy 2-core machine,
against 4.0-6.5 ms for tf.image (decode_and_crop_jpeg + antialiased resize); benchmarks/input_pipeline.py
measures both. JPEGs much larger than the crop are decoded at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling,
`Image.draft`).

The evaluation loader reads a whole test split into a `pipeline.ImageTextSplit` (shorter side resized
and centre-cropped), for the existing evaluator.
"""

import collections
import concurrent.futures
import dataclasses
import functools
import io
import itertools
import json
import multiprocessing
import os
import queue
import threading
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import jax
import ml_collections
import numpy as np
from PIL import Image

from hivlp_jax.data import karpathy
from hivlp_jax.data import tokenizer as tokenizer_lib
from hivlp_jax.data import webdataset

# Inception / torchvision RandomResizedCrop aspect range.
ASPECT_RATIO = (3 / 4, 4 / 3)
TFDS_NAMES = {'coco': 'coco_captions/2014', 'flickr30k': 'flickr30k'}
# Our split names -> TFDS split names, per data set (coco_captions keeps Karpathy's names).
TFDS_SPLITS = {'coco': {'train': ('train', 'restval'), 'validation': ('val',), 'test': ('test',)},
               'flickr30k': {'train': ('train',), 'validation': ('validation',), 'test': ('test',)}}


# ---------------------------------------------------------------------------------------------------------
# Image ops. Boxes are (left, top, right, bottom) in pixels of the full image.


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
                        scale: Sequence[float] = (0.5, 1.0)) -> np.ndarray:
  """Training augmentation of a decoded image uint8 [H, W, 3]: random resized crop + horizontal flip."""
  box = random_resized_crop_box(image.shape[0], image.shape[1], rng, scale)
  return crop_and_resize(image, box, size, flip=bool(rng.random() < 0.5))


def resize_and_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Evaluation transform of a decoded image uint8 [H, W, 3]: shorter side to `size`, centre crop."""
  return crop_and_resize(image, center_crop_box(image.shape[0], image.shape[1]), size)


def _open_reduced(data: Union[bytes, str], box: Sequence[int], size: int) -> tuple[Image.Image, tuple]:
  """Opens encoded image bytes (or a file) as RGB, JPEGs decoded at the smallest DCT scale that keeps `box`
  at least `size` px on each side. Returns the image and `box` in its pixels."""
  image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
  factor = min(box[2] - box[0], box[3] - box[1]) / size
  if factor >= 2:
    width, height = image.size
    # draft picks the largest reduction s in {1, 2, 4, 8} with W // s >= the requested width, so s <= factor.
    drafted = image.draft('RGB', (int(np.ceil(width / factor)), int(np.ceil(height / factor))))
    if drafted is not None:
      reduction = width / drafted[1][2]
      box = tuple(b / reduction for b in box)
  return image.convert('RGB'), box


def decode_for_training(data: Union[bytes, str], size: int, rng: np.random.Generator,
                        scale: Sequence[float] = (0.5, 1.0)) -> Optional[np.ndarray]:
  """`random_resized_crop` of encoded image bytes or a file; None when they are not a readable image.

  Equal to decoding then `random_resized_crop` with the same generator, up to the JPEG draft scale.
  """
  try:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as header:
      width, height = header.size  # Read from the header only.
    box = random_resized_crop_box(height, width, rng, scale)
    flip = bool(rng.random() < 0.5)
    image, box = _open_reduced(data, box, size)
    return crop_and_resize(image, box, size, flip)
  except Exception:  # pylint: disable=broad-except  (web images fail in many ways; each one is skipped)
    return None


def decode_for_eval(data: Union[bytes, str], size: int) -> Optional[np.ndarray]:
  """`resize_and_center_crop` of encoded image bytes or a file; None when they are not a readable image."""
  try:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as header:
      width, height = header.size
    image, box = _open_reduced(data, center_crop_box(height, width), size)
    return crop_and_resize(image, box, size)
  except Exception:  # pylint: disable=broad-except  (the caller reports unreadable evaluation images)
    return None


# ---------------------------------------------------------------------------------------------------------
# Sources: where examples come from, as shards that read into undecoded examples.


@dataclasses.dataclass(frozen=True)
class RawExample:
  """An undecoded example. image: encoded bytes, or the path of an image file (read by the worker).

  problem: '' for a usable example, else the `webdataset.ReadStats` field that counts it when skipped.
  """
  key: str
  image: Union[bytes, str, None]
  captions: tuple[str, ...]
  problem: str = ''


@dataclasses.dataclass(frozen=True)
class Source:
  """A data set as shards. `read(shard)` yields a shard's `RawExample`s in a fixed order.

  random_access: each shard is one `RawExample` (read returns it), so an epoch can be any permutation.
  """
  name: str
  shards: Sequence[Any]
  read: Callable[[Any], Iterator[RawExample]]
  random_access: bool = False


def _read_web_shard(path: str) -> Iterator[RawExample]:
  for key, image_bytes, caption, problem in webdataset.raw_samples(path):
    yield RawExample(key, image_bytes, (caption,) if caption else (), problem)


def webdataset_source(pattern: str) -> Source:
  """Tar shards of img2dataset's webdataset layout (see webdataset.expand_shards for the pattern)."""
  return Source('webdataset', webdataset.expand_shards(pattern), _read_web_shard)


def _entry_example(entry: dict) -> RawExample:
  return RawExample(entry['filename'], entry['path'], tuple(entry['captions']),
                    '' if entry['captions'] else 'empty_captions')


def karpathy_examples(name: str, manual_dir: str, split: str) -> list[RawExample]:
  """The examples of a split of Flickr30K or COCO from Karpathy's JSON + image folders in `manual_dir`."""
  if name not in karpathy.LAYOUTS:
    raise ValueError(f'No Karpathy layout for {name!r}; known: {sorted(karpathy.LAYOUTS)}.')
  return [_entry_example(e) for e in karpathy.read_manual_split(manual_dir, karpathy.LAYOUTS[name], split)]


def karpathy_source(name: str, manual_dir: str, split: str = 'train') -> Source:
  return Source(name, karpathy_examples(name, manual_dir, split), lambda example: iter((example,)),
                random_access=True)


def tfds_example(example: dict) -> RawExample:
  """A TFDS example read with the image undecoded -> RawExample.

  Maps coco_captions/2014 ('captions': {'text': [...], 'id': [...]}) and our Flickr30k builder
  ('captions': [...]); both have 'image' (JPEG bytes) and 'image/filename'.
  """
  captions = example['captions']
  if isinstance(captions, dict):
    captions = captions['text']
  texts = tuple(c.decode('utf-8').strip() if isinstance(c, bytes) else str(c).strip() for c in captions)
  texts = tuple(t for t in texts if t)
  filename = example['image/filename']
  key = filename.decode('utf-8') if isinstance(filename, bytes) else str(filename)
  return RawExample(key, bytes(example['image']), texts, '' if texts else 'empty_captions')


def tfds_builder(name: str, data_dir: str, manual_dir: str = ''):
  """The prepared TFDS builder of 'coco' (coco_captions/2014) or 'flickr30k' (ours, from the manual dir)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (only TFDS sources need it)
  if name == 'flickr30k':
    from hivlp_jax.data import flickr30k  # pylint: disable=g-import-not-at-top
    builder = flickr30k.Flickr30k(data_dir=data_dir)
    if not builder.is_prepared():
      flickr30k.LAYOUT.check(manual_dir)
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder
  if name != 'coco':
    raise ValueError(f'No TFDS builder for {name!r}; known: {sorted(TFDS_NAMES)}.')
  builder = tfds.builder(TFDS_NAMES[name], data_dir=data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f'TFDS {TFDS_NAMES[name]} is not prepared in {data_dir!r} (config.data.data_dir). Build it once with '
        f'`tfds build coco_captions --data_dir={data_dir}`: it downloads COCO 2014 train + val (about 19 GB) '
        "and Karpathy's caption_datasets.zip. Or set config.data.source='karpathy' and put "
        f"{karpathy.COCO.splits_file}, train2014/ and val2014/ in config.data.manual_dir.")
  return builder


def _read_tfds_shard(builder, shard: tuple[str, int]) -> Iterator[RawExample]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  split, index = shard
  dataset = builder.as_dataset(split=f'{split}[{index}shard:{index + 1}shard]', shuffle_files=False,
                               decoders={'image': tfds.decode.SkipDecoding()})
  for example in tfds.as_numpy(dataset):
    yield tfds_example(example)


def tfds_source(name: str, data_dir: str, split: str = 'train', manual_dir: str = '') -> Source:
  """A prepared TFDS data set, one shard per TFDS file (read whole, so no file is re-read in an epoch)."""
  builder = tfds_builder(name, data_dir, manual_dir)
  shards = [(tfds_split, i) for tfds_split in TFDS_SPLITS[name][split]
            for i in range(builder.info.splits[tfds_split].num_shards)]
  return Source(name, shards, functools.partial(_read_tfds_shard, builder))


def source_from_config(config: ml_collections.ConfigDict, split: str = 'train',
                       name: Optional[str] = None) -> Source:
  """The source that config.data names: 'webdataset', or 'flickr30k' / 'coco' read as config.data.source."""
  data = config.data
  name = name or data.name
  if name == 'webdataset':
    if split != 'train':
      raise ValueError('Web shards have no evaluation split: set config.data.eval_name to flickr30k or coco.')
    return webdataset_source(data.shards)
  if name not in karpathy.LAYOUTS:
    raise ValueError(f'config.data.name={name!r} has no streaming reader; known: webdataset, '
                     f'{", ".join(sorted(karpathy.LAYOUTS))}.')
  if data.source == 'karpathy':
    return karpathy_source(name, data.manual_dir, split)
  if data.source == 'tfds':
    return tfds_source(name, data.data_dir, split, data.manual_dir)
  raise ValueError(f"config.data.source={data.source!r} must be 'karpathy' (JSON + image folders in "
                   "config.data.manual_dir) or 'tfds' (a prepared TFDS builder in config.data.data_dir).")


# ---------------------------------------------------------------------------------------------------------
# The order: a pure function of (seed, host, position).


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


def _ordered_examples(source: Source, shards: Sequence[Any], seed: int, process_index: int, start: Position,
                      shards_per_group: int, shuffle_buffer: int) -> Iterator[tuple[RawExample, Position]]:
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
      raise RuntimeError(f'The {len(shards)} shards of {source.name} of host {process_index} hold no examples.')
    epoch, group = epoch + 1, 0


def _prepare(chunk: Sequence[tuple[RawExample, tuple[int, ...]]], image_size: int,
             crop_scale: tuple[float, float]) -> list[tuple[Optional[np.ndarray], Optional[str], str]]:
  """Worker task: [(image uint8 [S, S, 3] or None, caption or None, problem)] for (example, seed) pairs."""
  results = []
  for example, seed in chunk:
    if example.problem:
      results.append((None, None, example.problem))
      continue
    if isinstance(example.image, str) and not os.path.exists(example.image):
      results.append((None, None, 'missing_parts'))
      continue
    rng = np.random.default_rng(seed)
    caption = example.captions[int(rng.integers(len(example.captions)))]
    image = decode_for_training(example.image, image_size, rng, crop_scale)
    results.append((image, caption, '' if image is not None else 'corrupt_images'))
  return results


# ---------------------------------------------------------------------------------------------------------
# The training stream.


class TrainStream:
  """Iterator of training batches of a `Source`, decoded by workers and prefetched by a thread.

  Batches: {'image': uint8 [local_devices, per_device, S, S, 3], 'text': int32 [local_devices, per_device, L]},
  host arrays (or device arrays with `device_prefetch`). `get_state()` is the position after the last batch
  returned; `TrainStream(..., state=that)` continues with the next batch. Use as a context manager, or
  call `close()`, to stop the threads.

  transform(rng, batch) -> batch, when given, runs on each host batch ('image' [B, S, S, 3], 'text' [B, L];
  B the local batch) in the producer thread before the device split, e.g. masking; its generator is seeded
  by the batch's position, so a resumed stream repeats it.
  """

  def __init__(self, source: Source, tokenizer: tokenizer_lib.Tokenizer, *, global_batch: int,
               image_size: int, max_len: int, seed: int, crop_scale: Sequence[float] = (0.5, 1.0),
               shards_per_group: int = 4, shuffle_buffer: int = 1000, num_workers: int = 4,
               worker_processes: bool = False, prefetch: int = 2, device_prefetch: int = 0,
               transform: Optional[Callable[[np.random.Generator, dict], dict]] = None,
               state: Optional[dict] = None, process_index: Optional[int] = None,
               process_count: Optional[int] = None, local_devices: Optional[int] = None):
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    self.local_devices = jax.local_device_count() if local_devices is None else local_devices
    if global_batch % self.process_count or (global_batch // self.process_count) % self.local_devices:
      raise ValueError(f'Global batch {global_batch} does not split into {self.process_count} hosts x '
                       f'{self.local_devices} local devices.')
    self.local_batch = global_batch // self.process_count
    self.source, self.tokenizer, self.seed = source, tokenizer, seed
    self.shards = webdataset.shards_for_host(source.shards, self.process_index, self.process_count)
    self.image_size, self.max_len, self.crop_scale = image_size, max_len, tuple(crop_scale)
    self.shards_per_group, self.shuffle_buffer = shards_per_group, shuffle_buffer
    self.transform = transform
    self.stats = webdataset.ReadStats()  # Counted from this stream's start (a resume starts afresh).
    self._position = self._check_state(state) if state else Position()
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
    self._thread = threading.Thread(target=self._produce, name='batches', daemon=True)
    self._thread.start()

  # -- State.

  def get_state(self) -> dict:
    """A small JSON-able dict: the position after the last batch returned, and what it is valid for."""
    return dict(dataclasses.asdict(self._position), seed=self.seed, process_index=self.process_index,
                process_count=self.process_count, num_shards=len(self.shards), source=self.source.name)

  def _check_state(self, state: dict) -> Position:
    expected = {'seed': self.seed, 'process_index': self.process_index, 'process_count': self.process_count,
                'num_shards': len(self.shards), 'source': self.source.name}
    changed = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
    if changed:
      raise ValueError(f'The data state {state} was taken from another stream; changed (saved, now): {changed}. '
                       'A resumed run needs the same seed, hosts and shards to continue the data order.')
    return Position(int(state['epoch']), int(state['group']), int(state['offset']))

  # -- Producer.

  def _produce(self):
    try:
      for item in self._batches():
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

  def _decoded(self) -> Iterator[tuple[tuple, Position]]:
    """(worker result, position) in stream order; up to a window of chunks decoded ahead."""
    examples = _ordered_examples(self.source, self.shards, self.seed, self.process_index, self._position,
                                 self.shards_per_group, self.shuffle_buffer)

    def make_chunks(size=8):  # Tasks of a few examples: fewer futures, and fewer round trips to processes.
      while True:
        chunk = list(itertools.islice(examples, size))
        # Each example's generator is seeded with its position: the same draws whichever worker runs it.
        yield ([(e, (self.seed, self.process_index, p.epoch, p.group, p.offset)) for e, p in chunk],
               [p for _, p in chunk])

    prepare = functools.partial(_prepare, image_size=self.image_size, crop_scale=self.crop_scale)
    chunks = make_chunks()
    if self._executor is None:
      for tasks, positions in chunks:
        yield from zip(prepare(tasks), positions)
      return
    pending = collections.deque()
    for tasks, positions in chunks:
      pending.append((self._executor.submit(prepare, tasks), positions))
      if len(pending) >= 4 * self._num_workers:
        future, positions = pending.popleft()
        yield from zip(future.result(), positions)
        if self._stop.is_set():
          return

  def _batches(self) -> Iterator[tuple[dict, Position]]:
    images, captions = [], []
    last_good_epoch = self._position.epoch
    for (image, caption, problem), position in self._decoded():
      if problem:
        setattr(self.stats, problem, getattr(self.stats, problem) + 1)
        if position.epoch > last_good_epoch + 1:
          raise RuntimeError(f'A whole epoch of {len(self.shards)} shards of {self.source.name} gave no usable '
                             f'example on host {self.process_index}: {webdataset.count_by_reason(self.stats)}.')
        continue
      self.stats.samples += 1
      last_good_epoch = position.epoch
      images.append(image)
      captions.append(caption)
      if len(images) == self.local_batch:
        batch = {'image': np.stack(images), 'text': self.tokenizer.encode(captions, self.max_len)}
        end = Position(position.epoch, position.group, position.offset + 1)
        if self.transform is not None:  # Seeded by the batch's end position, unique in the stream.
          batch = self.transform(np.random.default_rng([self.seed, self.process_index, *dataclasses.astuple(end), 1]),
                                 batch)
        batch = {k: v.reshape((self.local_devices, -1) + v.shape[1:]) for k, v in batch.items()}
        yield batch, end
        images, captions = [], []

  # -- Consumer.

  def _next_host_batch(self) -> tuple[dict, Position]:
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
      batch, self._position = self._next_host_batch()
      return batch
    # As flax.jax_utils.prefetch_to_device, keeping each batch's position beside it.
    while len(self._on_device) < self._device_prefetch:
      batch, position = self._next_host_batch()
      self._on_device.append((_to_devices(batch), position))
    batch, self._position = self._on_device.popleft()
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
      source_from_config(config, 'train'), tokenizer, global_batch=config.batch_size,
      image_size=config.model.image_size, max_len=config.model.text.max_len, seed=config.seed,
      crop_scale=tuple(data.crop_scale), shards_per_group=data.shards_per_group,
      shuffle_buffer=data.shuffle_buffer, num_workers=data.num_workers, worker_processes=data.worker_processes,
      prefetch=data.prefetch, device_prefetch=data.device_prefetch, transform=transform, state=state)


# ---------------------------------------------------------------------------------------------------------
# Data state files beside checkpoints: one per host, since each host has its own position.


def state_file(directory: str, step: int, process_index: Optional[int] = None) -> str:
  process_index = jax.process_index() if process_index is None else process_index
  return os.path.join(directory, f'data_state_{step}_{process_index}.json')


def write_state(directory: str, step: int, state: dict) -> str:
  """Writes `state` atomically as the data state of `step` for this host; returns the path."""
  os.makedirs(directory, exist_ok=True)
  path = state_file(directory, step, state.get('process_index'))
  with open(path + '.tmp', 'w') as f:
    json.dump(state, f)
  os.replace(path + '.tmp', path)
  return path


def read_state(directory: str, step: int) -> Optional[dict]:
  """This host's data state of `step`, or None when there is none (start the stream afresh)."""
  path = state_file(directory, step)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


# ---------------------------------------------------------------------------------------------------------
# Evaluation.


def _eval_examples(config: ml_collections.ConfigDict, split: str) -> tuple[str, list[RawExample]]:
  name = config.data.get('eval_name') or config.data.name
  source = source_from_config(config, split, name=name)
  examples = [e for shard in source.shards for e in source.read(shard)]
  return name, examples


def load_eval_split(config: ml_collections.ConfigDict, split: str, tokenizer: tokenizer_lib.Tokenizer):
  """A whole evaluation split of Flickr30K or COCO in memory, for `evaluate.embed_split`.

  Returns `pipeline.ImageTextSplit`: images uint8 [N, S, S, 3] (shorter side resized, centre-cropped),
  tokens int32 [N, config.data.captions_per_image, L] (each image's first captions, as in the 1K / 5K
  test protocols), in the order of the split file. Any unreadable image is an error: a test split must be
  complete.
  """
  from hivlp_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (pipeline may import this module)
  name, examples = _eval_examples(config, split)
  per_image, size = config.data.captions_per_image, config.model.image_size
  short = [e.key for e in examples if len(e.captions) < per_image]
  if short:
    raise ValueError(f'{len(short)} {name} {split} images have fewer than {per_image} captions '
                     f'(config.data.captions_per_image), e.g. {short[:5]}.')
  with concurrent.futures.ThreadPoolExecutor(max(config.data.num_workers, 1)) as executor:
    images = list(executor.map(lambda e: decode_for_eval(e.image, size), examples))
  bad = [e.key for e, image in zip(examples, images) if image is None]
  if bad:
    raise ValueError(f'{len(bad)} {name} {split} images are missing or unreadable, e.g. {bad[:5]}.')
  captions = [list(e.captions[:per_image]) for e in examples]
  tokens = tokenizer.encode([c for row in captions for c in row], config.model.text.max_len)
  return pipeline.ImageTextSplit(images=np.stack(images), tokens=tokens.reshape(len(examples), per_image, -1),
                                 captions=captions)


def caption_texts(config: ml_collections.ConfigDict, limit: Optional[int] = None) -> Iterator[str]:
  """Training captions of config.data's source (for training a WordPiece vocabulary), at most `limit`."""
  source = source_from_config(config, 'train')
  texts = (c for shard in source.shards for e in source.read(shard) if not e.problem for c in e.captions)
  return itertools.islice(texts, limit)
