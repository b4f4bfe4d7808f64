"""Start a run from another run's checkpoint (`config.init`): pre-train, then fine-tune.

`config.init.workdir` (and `config.init.step`, 0: the newest) names a training run; its parameters (only
those: the new run has its own optimizer, schedule and queues) are copied into the freshly initialised
ones, array by array, by name. What does not fit is reported, never silently dropped:
  - a position embedding of another length: the image grid is resized bilinearly (as the ViT loader does),
    the text positions are cut, or extended with the new run's initial rows;
  - any other array of another shape (a new head size, another depth's extra blocks): left as initialised;
  - arrays only the new model has: left as initialised; arrays only the old one had: unused.
The token ids must mean the same tokens: the two runs must use the same vocabulary file contents, unless
`config.init.parts` names the parameter groups to copy without 'text_tower' (('image_tower', 'image_head'):
start a video run's frames from an image-text run with another vocabulary). (): every group.
`config.init.ema` also starts the momentum towers from the old run's (else they copy the new parameters).
"""

from typing import Any

from absl import logging
import ml_collections
import numpy as np

from hivlp_jax import checkpointing
from hivlp_jax import config_lib
from hivlp_jax import errors
from hivlp_jax import files
from hivlp_jax.models import pretrained

POSITION_EMBEDDINGS = ('image_tower/pos_embedding', 'text_tower/pos_embedding')


def _fit_position_embedding(name: str, old: np.ndarray, new: np.ndarray) -> np.ndarray:
  """An old position embedding [1, n_old, W] fitted to the new one's shape [1, n_new, W]."""
  if name.startswith('image_tower'):
    return pretrained.resize_position_embedding(old, new.shape[1])
  rows = min(old.shape[1], new.shape[1])  # Text: cut, or extend with the new initial rows.
  return np.concatenate([old[:, :rows], np.asarray(new)[:, rows:]], axis=1)


def merge(old_params, new_params, parts: tuple[str, ...] = ()) -> tuple[dict, pretrained.LoadReport]:
  """`new_params` with every array of `old_params` that fits copied in (see the module docstring); with
  `parts`, only the arrays of those top-level groups (the others are left as initialised, not reported)."""
  in_parts = lambda name: not parts or name.split('/')[0] in parts
  old, new = pretrained.flat_unscanned(old_params), pretrained.flat_unscanned(new_params)
  old = {name: value for name, value in old.items() if in_parts(name)}
  report = pretrained.LoadReport()
  for name, target in new.items():
    if not in_parts(name):
      continue
    if name not in old:
      report.left_new.append(name)
      continue
    value = np.asarray(old[name])
    if value.shape != np.shape(target) and name in POSITION_EMBEDDINGS and value.shape[-1] == np.shape(target)[-1]:
      value = _fit_position_embedding(name, value, target)
      report.reshaped.append(f'{name} {np.shape(old[name])} -> {value.shape}')
    if value.shape != np.shape(target):
      report.left_new.append(f'{name} (saved {value.shape}, now {np.shape(target)})')
      continue
    new[name] = value.astype(np.asarray(target).dtype)
    report.loaded.append(name)
  report.unused = sorted(set(old) - set(new))
  return pretrained.unflatten_like(new, new_params), report


def check_vocabulary(config: ml_collections.ConfigDict, source_config: dict) -> None:
  """Raises InputError when the vocabulary of the run that recorded `source_config` (its flat config.json)
  differs from this run's."""
  from hivlp_jax.data import pipeline  # pylint: disable=g-import-not-at-top  # Data code: only when used.
  vocab_path = pipeline.vocab_file(config)
  source = ml_collections.ConfigDict({'data': {
      'data_dir': source_config.get('data.data_dir', config.data.data_dir), 'name': source_config.get('data.name'),
      'builder_config': source_config.get('data.builder_config'),
      'vocab_file': source_config.get('data.vocab_file', ''), 'vocab_size': source_config.get('data.vocab_size')}})
  source_vocab = pipeline.vocab_file(source)
  if not files.path(source_vocab).exists():
    raise errors.MissingInputError(f'config.init.workdir={config.init.workdir}: its vocabulary {source_vocab} is '
                                   'missing, so its token embeddings cannot be matched to this run\'s tokens.')
  if files.path(source_vocab).read_text() != files.path(vocab_path).read_text():
    raise errors.InputError(f'config.init.workdir={config.init.workdir} was trained with the vocabulary '
                            f'{source_vocab}, this run uses {vocab_path} (another token list): its token ids '
                            f'would mean other words. Set config.data.vocab_file={source_vocab}.')


def load(config: ml_collections.ConfigDict, params) -> tuple[dict, Any, pretrained.LoadReport]:
  """(params, ema_params or None, report): `params` started from config.init's run (see the docstring).

  ema_params is the source run's momentum towers, merged the same way, when config.init.ema is set and it
  has them; else None (the caller starts them from the returned params).
  """
  workdir, step, parts = config.init.workdir, config.init.step or None, tuple(config.init.parts)
  if not files.path(workdir).is_dir():
    raise errors.MissingInputError(f'config.init.workdir={workdir} does not exist: give a training run\'s workdir.')
  unknown = sorted(set(parts) - set(params))
  if unknown:
    raise errors.InputError(f'config.init.parts={parts}: {unknown} are not parameter groups of this model; '
                            f'it has {sorted(params)}.')
  record = files.path(workdir) / config_lib.CONFIG_FILE
  if parts and 'text_tower' not in parts:
    logging.info('config.init.parts=%s: the text tower is not copied, so the vocabularies may differ.', parts)
  elif record.exists():
    check_vocabulary(config, checkpointing.read_config_record(record))
  else:
    logging.warning('config.init.workdir=%s has no %s: its vocabulary cannot be checked against this run\'s.',
                    workdir, config_lib.CONFIG_FILE)
  try:
    old, step = checkpointing.restore_params(workdir, step=step, step_name='config.init.step')
  except errors.MissingInputError as e:
    raise errors.MissingInputError(f'config.init.workdir={workdir}: {e}') from None
  params, report = merge(old, params, parts)
  logging.info('Parameters started from step %d of %s: %s', step, workdir, report)
  if report.reshaped or any('(saved' in name for name in report.left_new):
    logging.warning('From %s, fitted: %s; left as initialised (other shape): %s', workdir, report.reshaped,
                    [name for name in report.left_new if '(saved' in name])
  ema = None
  if config.init.ema:
    try:
      old_ema, _ = checkpointing.restore_params(workdir, step=step, key='ema_params')
    except errors.InputError:
      logging.warning('config.init.ema: step %d of %s has no momentum towers; they start from the parameters.',
                      step, workdir)
    else:
      ema, _ = merge(old_ema, params, parts)
  return params, ema, report
