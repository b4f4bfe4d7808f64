"""Whole evaluation splits of Flickr30K, COCO and MSR-VTT: read into memory, or checked before training starts.

The evaluation data set is config.data.eval_name when set (web pre-training evaluates on Flickr30K or
COCO), else config.data.name; its images are resized on the shorter side and centre-cropped. MSR-VTT's
videos become clips of config.model.video.num_frames frames at the segment centres (data/videos.py).
"""

import concurrent.futures
from typing import Optional

import ml_collections
import numpy as np

from hivlp_jax import errors
from hivlp_jax import files
from hivlp_jax.data import eval_sets
from hivlp_jax.data import image_text
from hivlp_jax.data import images as images_lib
from hivlp_jax.data import sources
from hivlp_jax.data import tokenizer as tokenizer_lib
from hivlp_jax.data import videos


def _check_captions(name: str, split: str, examples: list[sources.RawExample], per_image: int) -> None:
  if not examples:
    raise errors.InputError(f'The {name} {split} split has no images.')
  short = [e.key for e in examples if len(e.captions) < per_image]
  if short:
    raise errors.InputError(f'{len(short)} {name} {split} images have fewer than {per_image} captions '
                            f'(config.data.captions_per_image), e.g. {short[:5]}.')


def _decode(example: sources.RawExample, size: int, num_frames: int):
  data = example.image
  if example.kind == 'video':
    return videos.read_clip(data, size, num_frames)[0]
  if isinstance(data, str):
    data, _ = sources.read_image_file(data)
  return None if data is None else images_lib.decode_for_eval(data, size)


def load_eval_split(config: ml_collections.ConfigDict, split: str,
                    tokenizer: tokenizer_lib.Tokenizer) -> image_text.ImageTextSplit:
  """A whole evaluation split of Flickr30K, COCO or MSR-VTT in memory, for `evaluate.embed_split`.

  Returns images uint8 [N, S, S, 3] (shorter side resized, centre-cropped; MSR-VTT: clips [N, T, S, S, 3],
  T = config.model.video.num_frames, at the segment centres), tokens int32 [N, config.data.captions_per_image,
  L] (each image's first captions, as in the 1K / 5K test protocols), in the order of the split file. Any
  unreadable image is an error: a test split must be complete.
  """
  name = eval_sets.own_name(config)
  source = sources.source_from_config(config, split, name=name)
  examples = list(source.examples)
  per_image, size = config.data.captions_per_image, config.model.image_size
  _check_captions(name, split, examples, per_image)
  with concurrent.futures.ThreadPoolExecutor(max(config.data.num_workers, 1)) as executor:
    images = list(executor.map(lambda e: _decode(e, size, config.model.video.num_frames), examples))
  bad = [e.key for e, image in zip(examples, images) if image is None]
  if bad:
    raise errors.InputError(f'{len(bad)} {name} {split} images are missing or unreadable, e.g. {bad[:5]}.')
  captions = [list(e.captions[:per_image]) for e in examples]
  tokens = tokenizer.encode([c for row in captions for c in row], config.model.text.max_len)
  return image_text.ImageTextSplit(images=np.stack(images), tokens=tokens.reshape(len(examples), per_image, -1),
                                   captions=captions)


def check_eval_split(config: ml_collections.ConfigDict, split: str, tokenizer: tokenizer_lib.Tokenizer) -> int:
  """Checks, without decoding images, that `load_eval_split` will find the split; returns its image count.

  Karpathy layout: the split file (each entry's keys), every image's caption count and that its captions
  tokenise, and that every image file exists and has an image header (naming the first bad ones). TFDS: that
  the build is prepared and the split has examples (a TFDS file holds its images). Web shards have no
  evaluation split: ValueError.
  """
  name, data = eval_sets.own_name(config), config.data
  if name != 'webdataset' and data.get('source') == 'tfds':
    builder = sources.tfds_builder(name, data.data_dir, data.manual_dir)
    if split not in sources.TFDS_SPLITS[name]:
      raise errors.InputError(f'Unknown split {split!r} of {name}; known: {sorted(sources.TFDS_SPLITS[name])}.')
    count = sum(builder.info.splits[s].num_examples for s in sources.TFDS_SPLITS[name][split])
    if not count:
      raise errors.InputError(f'The {name} {split} split of the TFDS build in {data.data_dir!r} has no images.')
    return count
  examples = list(sources.source_from_config(config, split, name=name).examples)
  per_image = data.captions_per_image
  _check_captions(name, split, examples, per_image)
  tokenizer.encode([c for e in examples for c in e.captions[:per_image]], config.model.text.max_len)
  with concurrent.futures.ThreadPoolExecutor(max(data.num_workers, 1)) as executor:
    problems = list(executor.map(lambda e: _image_file_problem(e.image, e.kind), examples))
  missing = [e.image for e, problem in zip(examples, problems) if problem == 'missing']
  if missing:
    raise errors.MissingInputError(f'{len(missing)} of the {len(examples)} {name} {split} images are missing, '
                                   f'e.g. {missing[:5]} (config.data.manual_dir={data.manual_dir!r}).')
  unreadable = [e.image for e, problem in zip(examples, problems) if problem == 'unreadable']
  if unreadable:
    raise errors.InputError(f'{len(unreadable)} of the {len(examples)} {name} {split} images are not readable '
                            f'images, e.g. {unreadable[:5]}: a test split must be complete.')
  return len(examples)


def _image_file_problem(path: str, kind: str = 'image') -> Optional[str]:
  """'missing', 'unreadable' (its header is not an image's, or a video's) or None; reads the header only."""
  target = files.path(path)
  if not target.exists():
    return 'missing'
  if kind == 'video':
    return None if videos.is_readable(path) else 'unreadable'
  with target.open('rb') as f:
    head = f.read(1 << 20)  # Enough for any header; the pixels are decoded after training.
  return None if images_lib.header_size(head) else 'unreadable'
