"""Input pipeline: image-caption splits in memory, a resumable training order, padded evaluation batches.

The training order is a pure function of (seed, step): the batch of step s is the same whether the run
went straight to s or was resumed from a checkpoint, so resuming never restarts or repeats the data order.
"""

import dataclasses
from typing import Any, Callable, Iterator, NamedTuple, Optional

from absl import logging
import jax
import ml_collections
import numpy as np

from hivlp_jax import errors
from hivlp_jax import files
from hivlp_jax.data import embedded_scenes
from hivlp_jax.data import embedded_videos
from hivlp_jax.data import eval_splits
from hivlp_jax.data import frames
from hivlp_jax.data import image_text
from hivlp_jax.data import sources
from hivlp_jax.data import tokenizer as tokenizer_lib

ImageTextSplit = image_text.ImageTextSplit


class Embedded(NamedTuple):
  """A data set generated here and held in memory: the module of its TFDS builder (`load_split`,
  `num_examples`), the builder, and the key of its visual array: images [N, H, W, 3] or clips [N, T, H, W, 3]."""
  module: Any
  builder: type
  visual_key: str


EMBEDDED = {'embedded_scenes': Embedded(embedded_scenes, embedded_scenes.EmbeddedScenes, 'image'),
            'embedded_videos': Embedded(embedded_videos, embedded_videos.EmbeddedVideos, 'video')}


def vocab_file(config: ml_collections.ConfigDict) -> str:
  """config.data.vocab_file, or the vocabulary trained here, named by its size (another size trains anew).

  The embedded splits are fixed by their builder config; a streamed data set's name says nothing of its
  files, so its trained vocabulary is keyed by a fingerprint of its training data (`sources.fingerprint`):
  other files under the same name train their own instead of silently reusing a stale one.
  """
  data = config.data
  if data.vocab_file:
    return data.vocab_file
  key = sources.fingerprint(sources.source_from_config(config, 'train')) if is_streamed(config) else data.builder_config
  return str(files.path(data.data_dir) / f'{data.name}-{key}-vocab{data.vocab_size}.txt')


# Captions read to train a vocabulary for a streamed data set that comes without one.
VOCAB_TRAINING_CAPTIONS = 1_000_000


def is_streamed(config: ml_collections.ConfigDict) -> bool:
  """Real data sets (web shards, Flickr30K, COCO) stream through data/streaming.py; the embedded ones are in memory."""
  return config.data.name not in EMBEDDED


def get_tokenizer(config: ml_collections.ConfigDict) -> tokenizer_lib.Tokenizer:
  """Loads the tokenizer, training it on the training captions the first time."""
  path = vocab_file(config)
  if config.data.vocab_file or files.path(path).exists():
    return tokenizer_lib.Tokenizer(path)
  if is_streamed(config):
    texts = sources.caption_texts(config, limit=VOCAB_TRAINING_CAPTIONS)
  else:
    train = _load_raw(config, 'train')
    texts = (c for captions in train['captions'] for c in captions)
  return tokenizer_lib.train_tokenizer(texts, path, vocab_size=config.data.vocab_size)


# WORKDIR/vocabulary.json: the vocabulary a run trains with, its file and real size. config.json keeps what
# was asked, and data.vocab_size is only a target for a trained vocabulary (a small corpus gives fewer).
VOCABULARY_RECORD = 'vocabulary.json'


def record_vocabulary(workdir: str, config: ml_collections.ConfigDict, tokenizer: tokenizer_lib.Tokenizer) -> None:
  """Logs the vocabulary a run trains with and writes it to WORKDIR/vocabulary.json (process 0)."""
  asked = None if config.data.vocab_file else int(config.data.vocab_size)
  logging.info('Vocabulary: %d tokens from %s%s.', tokenizer.vocab_size, tokenizer.vocab_file,
               '' if asked is None else f' (trained here; config.data.vocab_size={asked} asked)')
  if jax.process_index() == 0:
    files.write_json(files.path(workdir) / VOCABULARY_RECORD,
                     {'file': tokenizer.vocab_file, 'tokens': tokenizer.vocab_size, 'asked': asked})


def trained_run_tokenizer(config: ml_collections.ConfigDict,
                          workdir: Optional[str] = None) -> tokenizer_lib.Tokenizer:
  """The tokenizer a trained run used; never trains one (its ids would not be the ones the model saw).

  The file the run recorded in WORKDIR/vocabulary.json when there is one, else the config's (`vocab_file`).
  """
  record = None if workdir is None else files.path(workdir) / VOCABULARY_RECORD
  vocab = files.read_json(record)['file'] if record is not None and record.exists() else vocab_file(config)
  if not files.path(vocab).exists():
    raise errors.MissingInputError(f'The run\'s vocabulary {vocab} is missing (config.data.data_dir / vocab_file).')
  return tokenizer_lib.Tokenizer(vocab)


def _embedded(config: ml_collections.ConfigDict) -> Embedded:
  """config.data.name, an embedded data set (InputError naming the known ones when it is none)."""
  if config.data.name not in EMBEDDED:
    raise errors.InputError(f'Unknown data set {config.data.name!r}; this build knows: {", ".join(EMBEDDED)}, '
                            'webdataset, flickr30k, coco.')
  return EMBEDDED[config.data.name]


def check_embedded_config(config: ml_collections.ConfigDict) -> None:
  """Raises InputError naming config.data.builder_config when the embedded set has no such builder config."""
  known = [c.name for c in _embedded(config).builder.BUILDER_CONFIGS]
  if config.data.builder_config not in known:
    raise errors.InputError(f'config.data.builder_config={config.data.builder_config!r} is not one of the '
                            f'{config.data.name} configs {known}.')


def _load_raw(config: ml_collections.ConfigDict, split: str) -> dict:
  """The split as its builder reads it, its images or clips under 'image'."""
  embedded = _embedded(config)
  raw = embedded.module.load_split(config.data.data_dir, split, config.data.builder_config)
  raw['image'] = raw.pop(embedded.visual_key)
  return raw


def load_split(config: ml_collections.ConfigDict, split: str,
               tokenizer: tokenizer_lib.Tokenizer) -> ImageTextSplit:
  """A whole split in memory (training on streamed data sets reads `streaming.TrainStream` instead)."""
  if is_streamed(config):
    return eval_splits.load_eval_split(config, split, tokenizer)
  raw = _load_raw(config, split)
  images = raw['image']
  if images.ndim == 5 and split != 'train':  # Evaluation sees the segment centres; training draws per step.
    images = frames.sample_clips(images, config.model.video.num_frames)
  captions = raw['captions']
  per_image = len(captions[0])
  flat = tokenizer.encode([c for row in captions for c in row], config.model.text.max_len)
  data = ImageTextSplit(images=images, tokens=flat.reshape(len(captions), per_image, -1), captions=captions)
  if split == 'train' and config.data.get('reversed_pairs_in_batch'):
    if 'reverse_of' not in raw:
      raise errors.InputError(f'config.data.reversed_pairs_in_batch=True: {config.data.name} has no reversed '
                              'clips (only embedded_videos does); set it to False.')
    data = dataclasses.replace(data, groups=reversal_groups(raw['reverse_of']))
  if split == 'train' and config.data.noisy_caption_fraction:
    data = with_replaced_captions(data, config.data.noisy_caption_fraction, config.seed)
  return data


def reversal_groups(reverse_of: np.ndarray) -> np.ndarray:
  """int [N]: one group per clip and its reverse (the forward clip's index), from reverse_of int [N] (-1: none)."""
  groups = np.arange(len(reverse_of))
  backward = reverse_of >= 0
  groups[backward] = reverse_of[backward]
  return groups


def check_split(config: ml_collections.ConfigDict, split: str, tokenizer: tokenizer_lib.Tokenizer) -> int:
  """Checks, cheaply and before training, that `load_split(config, split, tokenizer)` will work.

  Returns the split's number of images. Flickr30K / COCO: see `eval_splits.check_eval_split` (the split file,
  the captions, and that every image file exists, naming the first missing ones). The embedded data set is
  generated on demand and cannot miss a file: only the split's name is checked.
  """
  if is_streamed(config):
    return eval_splits.check_eval_split(config, split, tokenizer)
  return _embedded(config).module.num_examples(config.data.builder_config, split)


def with_replaced_captions(data: ImageTextSplit, fraction: float, seed: int) -> ImageTextSplit:
  """Noisy pairs, as in web data: `fraction` of the images get all the captions of another image.

  The chosen images pass their captions round in a random cycle, so none keeps its own, and
  `replaced` records which they are (to measure a noisy-pair filter against).
  """
  if not 0.0 <= fraction < 1.0:
    raise errors.InputError(f'config.data.noisy_caption_fraction={fraction} must be in [0, 1).')
  rng = np.random.default_rng([seed, 7])
  chosen = rng.choice(data.num_images, size=int(round(fraction * data.num_images)), replace=False)
  if len(chosen) < 2:
    return data
  donors = np.roll(chosen, 1)
  tokens = data.tokens.copy()
  tokens[chosen] = data.tokens[donors]
  captions = None
  if data.captions is not None:
    captions = list(data.captions)
    for target, donor in zip(chosen, donors):
      captions[target] = data.captions[donor]
  replaced = np.zeros(data.num_images, bool)
  replaced[chosen] = True
  return dataclasses.replace(data, tokens=tokens, captions=captions, replaced=replaced)


class TrainOrder:
  """Deterministic epoch-wise shuffled order of (image, caption) pairs, indexed by step.

  With `groups` (int [num_images]) an epoch shuffles the groups and puts the members of each next to each
  other, in random order, so a group mostly lands in one batch (unless it straddles a batch boundary).

  Step s holds positions s * global_batch ... of the concatenated epoch permutations. A batch that straddles
  an epoch's end takes the rest of that epoch, then the next epoch's permutation from its start, skipping
  images already in the batch (an image must not be its own negative); those it skips appear in that batch
  anyway, and the few it takes in their place come again a batch later.
  """

  def __init__(self, num_images: int, captions_per_image: int, global_batch: int, seed: int,
               groups: Optional[np.ndarray] = None):
    if global_batch > num_images:
      raise errors.InputError(f'A global batch of {global_batch} cannot hold {num_images} images once each.')
    self.num_images = num_images
    self.captions_per_image = captions_per_image
    self.global_batch = global_batch
    self.seed = seed
    self.groups = None if groups is None else np.unique(groups, return_inverse=True)[1]  # Dense ids 0..G-1.
    self._orders = {}

  def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(image permutation int [num_images], caption index of each image int [num_images]) of `epoch`."""
    if epoch not in self._orders:
      if len(self._orders) >= 2:  # A batch reads at most two epochs.
        self._orders.pop(min(self._orders))
      rng = np.random.default_rng([self.seed, epoch])
      if self.groups is None:
        order = rng.permutation(self.num_images)
      else:  # Sorted by the group's place in a permutation of the groups, then at random within the group.
        place = rng.permutation(self.groups.max() + 1)[self.groups]
        order = np.lexsort((rng.random(self.num_images), place))
      self._orders[epoch] = (order, rng.integers(0, self.captions_per_image, self.num_images))
    return self._orders[epoch]

  def indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (image index, caption index), each int [global_batch], of training step `step`."""
    epoch, offset = divmod(step * self.global_batch, self.num_images)
    order, captions = self._epoch_order(epoch)
    image_idx = order[offset:offset + self.global_batch]
    caption_idx = captions[image_idx]
    missing = self.global_batch - len(image_idx)
    if missing:
      order, captions = self._epoch_order(epoch + 1)
      # At most len(image_idx) of the first global_batch images of the next epoch are already in the batch.
      head = order[:self.global_batch]
      head = head[~np.isin(head, image_idx)][:missing]
      image_idx, caption_idx = np.concatenate([image_idx, head]), np.concatenate([caption_idx, captions[head]])
    return image_idx.astype(np.int64), caption_idx.astype(np.int64)


def train_batches(data: ImageTextSplit, global_batch: int, seed: int, start_step: int,
                  transform: Optional[Callable[[np.random.Generator, dict], dict]] = None,
                  num_frames: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Yields this host's part of each global batch from `start_step` on, shaped for `pmap`.

  Each batch: 'image' uint8 [local_devices, per_device, H, W, 3], 'text' int32 [local_devices, per_device, L],
  'image_id' int32 [local_devices, per_device] (the image's index in the split), with the noisy-pair option
  'noisy' bool [local_devices, per_device] (the pair's caption was replaced),
  and with `data.image_codes` 'image_codes' int32 [local_devices, per_device, patches].
  transform(rng, host batch) -> host batch runs before the device split (e.g. masking), with a generator
  seeded by (seed, step, host) so that a resumed run repeats it.
  Clips (`data.images` uint8 [N, T, H, W, 3]) give 'image' [local_devices, per_device, num_frames, H, W, 3]:
  a random frame of each of `num_frames` segments per clip and step (`frames.sample_clips`), seeded likewise
  (0: every stored frame).
  """
  num_hosts, host = jax.process_count(), jax.process_index()
  local_batch = global_batch // num_hosts
  order = TrainOrder(data.num_images, data.captions_per_image, global_batch, seed, data.groups)
  step = start_step
  while True:
    image_idx, caption_idx = order.indices(step)
    mine = slice(host * local_batch, (host + 1) * local_batch)
    image_idx, caption_idx = image_idx[mine], caption_idx[mine]
    images = data.images[image_idx]
    if images.ndim == 5 and num_frames:
      images = frames.sample_clips(images, num_frames, np.random.default_rng([seed, step, host, 2]))
    batch = {'image': images, 'text': data.tokens[image_idx, caption_idx],
             'image_id': image_idx.astype(np.int32)}
    if data.replaced is not None:
      batch['noisy'] = data.replaced[image_idx]  # Only measured against, never trained on.
    if data.image_codes is not None:
      batch['image_codes'] = data.image_codes[image_idx].reshape(len(image_idx), -1)
    if transform is not None:
      batch = transform(np.random.default_rng([seed, step, host, 1]), batch)
    yield shard(batch)
    step += 1


def shard(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Reshapes leading axis B to [local_devices, B // local_devices]."""
  devices = jax.local_device_count()
  return jax.tree.map(lambda x: x.reshape((devices, -1) + x.shape[1:]), batch)


def padded_batches(array: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Splits `array` [N, ...] into batches of exactly `batch_size` rows, padding the last one.

  Yields (batch [batch_size, ...], mask bool [batch_size]); padded rows repeat row 0 and have mask False,
  so no example is dropped or counted twice.
  """
  for start in range(0, array.shape[0], batch_size):
    chunk = array[start:start + batch_size]
    mask = np.zeros(batch_size, bool)
    mask[:chunk.shape[0]] = True
    if chunk.shape[0] < batch_size:
      pad = np.repeat(array[:1], batch_size - chunk.shape[0], axis=0)
      chunk = np.concatenate([chunk, pad], axis=0)
    yield chunk, mask
