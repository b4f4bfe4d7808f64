"""Evaluation sets by name: which sets `--mode=evaluate` runs (config.eval.datasets) and where each is read.

The run's own evaluation set (config.data.eval_name, else config.data.name) is read where config.data says,
so its metrics are the ones training wrote. Any other set is read from config.eval.locations.<name>: the
run's config with its data fields pointed there (`dataset_config`), so every reader stays the one it is.
"""

import contextlib
from typing import Iterator

import ml_collections

from hivlp_jax import errors
from hivlp_jax.data import embedded_scenes

# The data sets with evaluation splits (web shards have none).
NAMES = ('embedded_scenes', 'flickr30k', 'coco', 'msrvtt')


def own_name(config: ml_collections.ConfigDict) -> str:
  """The run's own evaluation set: config.data.eval_name (web pre-training), else config.data.name."""
  return config.data.get('eval_name') or config.data.name


def names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """config.eval.datasets, checked (InputError naming the element), or (the run's own set,) when empty."""
  datasets = tuple(config.eval.get('datasets', ()))
  for i, name in enumerate(datasets):
    if not isinstance(name, str) or not name.strip():
      what = 'is empty' if isinstance(name, str) else 'is not a name'
      raise errors.InputError(f'config.eval.datasets[{i}]={name!r} {what}: name an evaluation set (one of '
                              f'{NAMES}) or leave the element out.')
    if name not in NAMES:
      raise errors.InputError(f'config.eval.datasets[{i}]={name!r} is not a known evaluation set; known: {NAMES} '
                              '(web shards have no evaluation split).')
    if name in datasets[:i]:
      raise errors.InputError(f'config.eval.datasets={datasets} names {name!r} twice: each set is evaluated once, '
                              'into one metrics file.')
  return datasets or (own_name(config),)


def dataset_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """The config that reads evaluation set `name`: `config` itself for the run's own set, else an unlocked
  copy whose config.data is pointed at config.eval.locations.<name> (fields the streaming readers need and
  the run lacks, e.g. captions_per_image in an embedded run, get configs/flickr30k.py's defaults)."""
  if name == own_name(config):
    return config
  if name not in config.eval.locations:  # E.g. msrvtt, which configs/default.py does not place.
    raise errors.InputError(f'config.eval.datasets names {name!r}, but config.eval.locations has no {name!r} entry '
                            f"saying where it is: add one in the config file (config.eval.locations.{name} = "
                            "dict(manual_dir=..., data_dir=...)), or evaluate it from a run whose own set it is.")
  derived = ml_collections.ConfigDict(config.to_dict())
  data = derived.data
  if name != 'embedded_scenes':
    from configs import flickr30k  # pylint: disable=g-import-not-at-top  (the one definition of these fields)
    defaults = flickr30k.add_streaming_data_fields(ml_collections.ConfigDict({'data': {}})).data
    for key, value in defaults.items():
      if key not in data:
        data[key] = value
  data.update(config.eval.locations[name].to_dict())
  data.name = name
  if 'eval_name' in data:
    data.eval_name = ''
  if name == 'embedded_scenes':
    _check_scene_size(derived)
  return derived


def _check_scene_size(config: ml_collections.ConfigDict) -> None:
  """The embedded scenes are read as generated, not resized: their size must be the model's."""
  known = {c.name: c for c in embedded_scenes.EmbeddedScenes.BUILDER_CONFIGS}
  builder = config.data.builder_config
  if builder not in known:
    raise errors.InputError(f'config.eval.locations.embedded_scenes.builder_config={builder!r} is not one of the '
                            f'embedded scenes\' configs {sorted(known)}.')
  size = known[builder].image_size
  if size != config.model.image_size:
    raise errors.InputError(f'its {size} px images are not the model\'s size (config.model.image_size='
                            f'{config.model.image_size}) and are read as generated: leave it out of '
                            'config.eval.datasets.')


@contextlib.contextmanager
def naming(config: ml_collections.ConfigDict, name: str) -> Iterator[None]:
  """An InputError raised in the block, when set `name` is not the run's own (whose messages name
  config.data's fields), names config.eval.locations.<name> instead, where that set's location is set;
  the error keeps its class."""
  try:
    yield
  except errors.InputError as e:
    if name == own_name(config):
      raise
    message = str(e)
    for key in config.eval.locations[name]:
      message = message.replace(f'config.data.{key}', f'config.eval.locations.{name}.{key}')
    raise type(e)(f'Evaluation set {name!r} of config.eval.datasets (read as config.eval.locations.{name} says): '
                  f'{message}') from None
