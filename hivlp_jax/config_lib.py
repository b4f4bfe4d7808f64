"""Config checks that fail at start-up with a message naming the bad field."""

import importlib.util
import json
import os

from absl import logging
import jax
import ml_collections

from hivlp_jax import losses
from hivlp_jax import momentum
from hivlp_jax import queues
from hivlp_jax import retrieval
from hivlp_jax.models import matryoshka
from hivlp_jax.models import pretrained

# Fields that may change when a run is resumed in the same workdir; any other difference is an error.
RESUMABLE_FIELDS = ('num_train_steps', 'log_every_steps', 'checkpoint_every_steps', 'max_checkpoints_to_keep',
                    'max_consecutive_nonfinite_steps', 'data.data_dir', 'data.manual_dir', 'data.shards',
                    'data.num_workers', 'data.worker_processes', 'data.prefetch', 'data.device_prefetch', 'eval.')
CONFIG_FILE = 'config.json'
DATA_SETS = ('embedded_scenes', 'webdataset', 'flickr30k', 'coco')
TEXT_ARCHITECTURES = ('pre_ln', 'bert')  # two_towers.TextTransformer, bert.BertTextTransformer.


def flatten(config: ml_collections.ConfigDict, prefix: str = '') -> dict:
  """{'model.image.width': 128, ...}, with sequences as strings (for hparams and comparisons)."""
  flat = {}
  for key, value in config.items():
    name = prefix + key
    if isinstance(value, ml_collections.ConfigDict):
      flat.update(flatten(value, name + '.'))
    else:
      is_scalar = value is None or isinstance(value, (int, float, str, bool))
      flat[name] = value if is_scalar else str(tuple(value))
  return flat


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file, as --config=path loads it (no ':arg' suffix)."""
  spec = importlib.util.spec_from_file_location('hivlp_config', path.split(':', 1)[0])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def unknown_override_keys(config: ml_collections.ConfigDict, argv: list[str]) -> list[str]:
  """The `--config.a.b=...` overrides in argv whose key path does not exist in `config`."""
  unknown = []
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    node = config
    for key in arg[len('--config.'):].split('=', 1)[0].split('.'):
      if not isinstance(node, ml_collections.ConfigDict) or key not in node:
        unknown.append(arg.split('=', 1)[0][2:])
        break
      node = node[key]
  return unknown


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field when the config cannot run on the devices at hand."""
  if config.data.name not in DATA_SETS:
    raise ValueError(f'config.data.name={config.data.name!r} is not one of {DATA_SETS}.')
  dims = matryoshka.validate_dims(config.model.nested_dims, config.model.embed_dim)
  if len(config.loss.dim_weights) != len(dims):
    raise ValueError(f'config.loss.dim_weights has {len(config.loss.dim_weights)} entries but '
                     f'config.model.nested_dims has {len(dims)}: give one weight per nested dim.')
  devices = jax.device_count()
  if config.batch_size % devices:
    raise ValueError(f'config.batch_size={config.batch_size} is not divisible by the {devices} devices; '
                     f'use a multiple of {devices}.')
  if config.model.image_size % config.model.image.patch_size:
    raise ValueError(f'config.model.image_size={config.model.image_size} is not a multiple of '
                     f'config.model.image.patch_size={config.model.image.patch_size}.')
  for tower in ('image', 'text'):
    width, heads = config.model[tower].width, config.model[tower].num_heads
    if width % heads:
      raise ValueError(f'config.model.{tower}.width={width} is not divisible by num_heads={heads}.')
  if config.num_train_steps < 0:
    raise ValueError(f'config.num_train_steps={config.num_train_steps} must be >= 0.')
  if config.eval.two_stage_backend not in retrieval.BACKENDS:
    raise ValueError(f'config.eval.two_stage_backend={config.eval.two_stage_backend!r} is not one of '
                     f'{retrieval.BACKENDS}.')
  retrieval.ScannSettings.from_config(config.eval.scann)
  validate_contrastive(config)
  validate_mvlm(config)
  validate_text_tower(config)


def validate_text_tower(config: ml_collections.ConfigDict) -> None:
  """Checks config.model.text.architecture and the BERT checkpoint it may start from."""
  text = config.model.text
  if text.architecture not in TEXT_ARCHITECTURES:
    raise ValueError(f'config.model.text.architecture={text.architecture!r} is not one of {TEXT_ARCHITECTURES}.')
  if not text.init_checkpoint:
    return
  if text.architecture != 'bert':
    raise ValueError(f'config.model.text.init_checkpoint={text.init_checkpoint!r} is a BERT checkpoint, which fits '
                     f"only config.model.text.architecture='bert' (not {text.architecture!r}).")
  try:
    prefix = pretrained.bert_checkpoint_prefix(text.init_checkpoint)
  except FileNotFoundError as e:
    raise ValueError(f'config.model.text.init_checkpoint: {e}') from None
  # The checkpoint's word embeddings are rows of its vocab.txt: the tokenizer must read the same ids.
  checkpoint_vocab = f'{prefix.rpartition("/")[0] or "."}/vocab.txt'
  if not pretrained.gfile().exists(checkpoint_vocab):
    return
  if not config.data.vocab_file:
    raise ValueError(f'config.model.text.init_checkpoint={text.init_checkpoint!r} with an empty '
                     f'config.data.vocab_file: a vocabulary trained on the captions would not match the '
                     f"checkpoint's word embeddings. Set config.data.vocab_file={checkpoint_vocab!r}.")
  if pretrained.gfile().exists(config.data.vocab_file):
    with pretrained.gfile().GFile(checkpoint_vocab) as f:
      expected = f.read().splitlines()
    with pretrained.gfile().GFile(config.data.vocab_file) as f:
      actual = f.read().splitlines()
    rows = min(len(expected), len(actual))
    if expected[:rows] != actual[:rows]:
      raise ValueError(f'config.data.vocab_file={config.data.vocab_file!r} differs from the vocab.txt of '
                       f'config.model.text.init_checkpoint ({checkpoint_vocab}): the token ids would index the '
                       'wrong rows of its word embeddings. Use that vocab.txt (extending it at the end is fine).')


def validate_mvlm(config: ml_collections.ConfigDict) -> None:
  """Checks config.mvlm (masked vision-language modeling) and, with MVM, config.visual_tokenizer."""
  m = config.mvlm
  for name in ('mlm_weight', 'mvm_weight'):
    if m[name] < 0:
      raise ValueError(f'config.mvlm.{name}={m[name]} must be >= 0 (0: off).')
  for name in ('text_mask_ratio', 'image_mask_ratio'):
    if not 0.0 < m[name] < 1.0:
      raise ValueError(f'config.mvlm.{name}={m[name]} must be in (0, 1).')
  patches = (config.model.image_size // config.model.image.patch_size)**2
  if not 1 <= m.min_block_patches <= patches:
    raise ValueError(f'config.mvlm.min_block_patches={m.min_block_patches} must be in [1, {patches}] '
                     f'(the patches of a {config.model.image_size} px image).')
  if m.mvm_weight and config.data.name != 'embedded_scenes':
    # The visual-token codes are cached per image of an in-memory split; streamed sources would need the
    # frozen tokenizer inside the step.
    raise ValueError(f'config.mvlm.mvm_weight={m.mvm_weight}: masked vision modeling runs on the embedded data '
                     f'set only so far, not on {config.data.name!r}; set it to 0.')
  if m.mvm_weight:
    from hivlp_jax import visual_tokenizer  # pylint: disable=g-import-not-at-top  (it imports this module)
    visual_tokenizer.validate_config(config)


def validate_contrastive(config: ml_collections.ConfigDict) -> None:
  """Checks config.contrastive (momentum queues, distillation, KL alignment, noisy-pair filter)."""
  c = config.contrastive
  if c.queue_size < 0:
    raise ValueError(f'config.contrastive.queue_size={c.queue_size} must be >= 0 (0: in-batch negatives only).')
  if c.queue_size == 0:
    for name in ('distill_weight', 'kl_weight', 'filter_noisy_pairs'):
      if c[name]:
        raise ValueError(f'config.contrastive.{name}={c[name]!r} needs the momentum queues: set '
                         f'config.contrastive.queue_size to a multiple of config.batch_size.')
    return
  queues.validate_size(c.queue_size, config.batch_size)
  if not 0.0 <= c.momentum <= 1.0:
    raise ValueError(f'config.contrastive.momentum={c.momentum} must be in [0, 1].')
  choices = {'momentum_schedule': momentum.SCHEDULES, 'kl_direction': losses.KL_DIRECTIONS,
             'kl_stop_gradient': losses.KL_STOP_GRADIENTS}
  for name, allowed in choices.items():
    if c[name] not in allowed:
      raise ValueError(f'config.contrastive.{name}={c[name]!r} is not one of {allowed}.')
  if not 0.0 <= c.distill_weight <= 1.0:
    raise ValueError(f'config.contrastive.distill_weight={c.distill_weight} must be in [0, 1].')
  for name in ('distill_warmup_steps', 'kl_weight', 'filter_k'):
    if c[name] < 0:
      raise ValueError(f'config.contrastive.{name}={c[name]} must be >= 0.')
  if not 0.0 <= c.filter_stats_momentum < 1.0:
    raise ValueError(f'config.contrastive.filter_stats_momentum={c.filter_stats_momentum} must be in [0, 1).')


def _differences(saved: dict, current: dict) -> list[str]:
  # A field the saved record lacks was added to the code after that run started: its default applies.
  keys = sorted(set(saved))
  changed = [k for k in keys if saved.get(k) != current.get(k)]
  return [k for k in changed if not any(k == f or (f.endswith('.') and k.startswith(f)) for f in RESUMABLE_FIELDS)]


def check_workdir_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Records the config in `workdir`, or checks it against the one a previous run recorded there."""
  path = os.path.join(workdir, CONFIG_FILE)
  current = json.loads(json.dumps(flatten(config)))
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    added = sorted(set(current) - set(saved))
    if added:
      logging.warning('Config fields new since the run in %s started (their current values apply): %s',
                      workdir, ', '.join(f'{k}={current[k]!r}' for k in added[:20]))
    bad = _differences(saved, current)
    if bad:
      details = '; '.join(f'{k}: {saved.get(k)!r} -> {current.get(k)!r}' for k in bad[:8])
      raise ValueError(f'Workdir {workdir!r} holds a run of another config ({details}). '
                       'Use a new --workdir, or pass the same config to resume that run.')
  if jax.process_index() == 0:
    with open(path + '.tmp', 'w') as f:
      json.dump(current, f, indent=2, sort_keys=True)
    os.replace(path + '.tmp', path)
