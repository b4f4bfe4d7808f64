"""Config checks that fail at start-up with a message naming the bad field."""

import importlib.util
import json
import math
import re
import sys

from absl import flags
import jax
import ml_collections

from hivlp_jax import checkpointing
from hivlp_jax import errors
from hivlp_jax import evaluate
from hivlp_jax import files
from hivlp_jax import settings
from hivlp_jax.data import eval_sets
from hivlp_jax.data import pipeline
from hivlp_jax.models import dvae
from hivlp_jax.models import encoders
from hivlp_jax.models import pretrained
from hivlp_jax.models import video

# Fields that may change when a run is resumed in the same workdir; any other difference is an error.
RESUMABLE_FIELDS = ('num_train_steps', 'train_minutes', 'init.', 'log_every_steps', 'checkpoint_every_steps',
                    'max_checkpoints_to_keep', 'max_consecutive_nonfinite_steps', 'data.data_dir', 'data.manual_dir',
                    'data.shards', 'data.num_workers', 'data.prefetch', 'data.device_prefetch',
                    'eval.')
CONFIG_FILE = 'config.json'
DATA_SETS = ('embedded_scenes', 'embedded_videos', 'webdataset', 'flickr30k', 'coco', 'msrvtt')
DTYPES = ('float32', 'bfloat16', 'float16')  # The towers' compute dtype; parameters stay float32.
TEXT_ARCHITECTURES = ('pre_ln', 'bert')  # encoders.TextTransformer, bert.BertTextTransformer.
TOKENIZER_SPLITS = ('train', 'validation', 'test')


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


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing for the entry points: a bad flag, a misspelt --config.x override or a config file
  that does not load ends the program with one line naming it, instead of a traceback."""
  try:
    remaining = flags.FLAGS(argv)
    if 'config' in flags.FLAGS and flags.FLAGS['config'].present:
      flags.FLAGS.config.keys()  # config_flags loads the file lazily: fail here, naming it.
    return remaining
  except flags.IllegalFlagValueError as e:  # E.g. --config.batch_size=abc.
    sys.exit(f'Bad flag value: {str(e).splitlines()[0]}')
  except flags.UnrecognizedFlagError as e:
    sys.exit(f'Unknown flag --{e.flagname}; --helpfull lists the flags.')
  except OSError as e:  # A config file that does not exist or does not load.
    paths = [a.split('=', 1)[1] for a in argv if a.startswith('--config=')]
    sys.exit(f'The config file {paths[-1] if paths else ""!r} could not be loaded: '
             f'{" ".join(str(e).split())[-300:]}')
  except (AttributeError, KeyError) as e:
    paths = [a.split('=', 1)[1] for a in argv if a.startswith('--config=')]
    unknown = unknown_override_keys(load_config_file(paths[-1]), argv) if paths else []
    if not unknown:
      raise
    suggestion = re.search(r'Did you mean "(\w+)"', str(e))
    hint = f' Did you mean {suggestion.group(1)!r}?' if suggestion else ''
    sys.exit(f'Unknown config key {unknown[0]!r} on the command line.{hint} The config file lists the keys.')


def _check_types(config: ml_collections.ConfigDict, default: ml_collections.ConfigDict, prefix: str = '') -> None:
  """Every field has the type of the default config's field (an int where a float is expected is fine)."""
  for key, expected in default.items():
    if key not in config:
      continue
    value, name = config[key], prefix + key
    if isinstance(expected, ml_collections.ConfigDict):
      if isinstance(value, ml_collections.ConfigDict):
        _check_types(value, expected, name + '.')
      continue
    if expected is None or value is None:
      continue
    if isinstance(expected, bool) or isinstance(value, bool):
      ok = isinstance(value, bool) == isinstance(expected, bool)
    elif isinstance(expected, (int, float)):
      ok = isinstance(value, (int, float)) and (isinstance(expected, float) or isinstance(value, int))
    elif isinstance(expected, (tuple, list)):
      ok = isinstance(value, (tuple, list))
    else:
      ok = isinstance(value, type(expected))
    settings.check_field(ok, name, value, f'has type {type(value).__name__}, but the field takes a {type(expected).__name__}')


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field when the config cannot run on the devices at hand."""
  from configs import default  # pylint: disable=g-import-not-at-top  (the reference for every field's type)
  _check_types(config, default.get_config())
  settings.check_field(config.data.name in DATA_SETS, 'data.name', config.data.name, f'is not one of {DATA_SETS}')
  if config.data.name in pipeline.EMBEDDED:
    pipeline.check_embedded_config(config)
  settings.check_field(config.model.dtype in DTYPES, 'model.dtype', config.model.dtype, f'is not one of {DTYPES}')
  image_init = config.model.image.init_checkpoint
  settings.check_field(not image_init or files.path(image_init).exists(), 'model.image.init_checkpoint', image_init,
                       'does not exist (a ViT .npz or Hugging Face folder, see models/pretrained.py; empty: from '
                       'scratch)')
  for name in ('batch_size', 'log_every_steps', 'checkpoint_every_steps', 'max_checkpoints_to_keep',
               'max_consecutive_nonfinite_steps', 'eval.batch_size'):
    value = config[name] if '.' not in name else config.eval[name.split('.')[1]]
    settings.check_field(value >= 1, name, value, 'must be >= 1')
  settings.check_field(config.num_train_steps >= 0, 'num_train_steps', config.num_train_steps, 'must be >= 0')
  settings.check_field(math.isfinite(config.train_minutes) and config.train_minutes >= 0, 'train_minutes',
                       config.train_minutes, 'must be finite and >= 0 (0: no time budget)')
  settings.check_field(config.model.text.max_len >= 2, 'model.text.max_len', config.model.text.max_len,
         'must be >= 2 ([CLS] and at least one token)')
  opt = config.optimizer
  for name in ('learning_rate', 'weight_decay', 'grad_clip_norm', 'end_learning_rate_fraction'):
    settings.check_field(math.isfinite(opt[name]) and opt[name] >= 0, f'optimizer.{name}', opt[name], 'must be finite and >= 0')
  settings.check_field(opt.warmup_steps >= 0, 'optimizer.warmup_steps', opt.warmup_steps, 'must be >= 0')
  settings.check_field(0.0 <= opt.warmup_fraction < 1.0, 'optimizer.warmup_fraction', opt.warmup_fraction,
                       'must be in [0, 1) (a share of num_train_steps; 0: warmup_steps applies)')
  for name in ('b1', 'b2'):
    settings.check_field(0.0 <= opt[name] < 1.0, f'optimizer.{name}', opt[name], 'must be in [0, 1)')
  devices = jax.device_count()
  if config.batch_size % devices:
    raise errors.InputError(f'config.batch_size={config.batch_size} is not divisible by the {devices} devices; '
                            f'use a multiple of {devices}.')
  steps, per_device = config.accumulation_steps, config.batch_size // devices
  settings.check_field(steps >= 1, 'accumulation_steps', steps, 'must be >= 1 (1: no gradient accumulation)')
  if per_device % steps:
    raise errors.InputError(f'config.accumulation_steps={steps} does not divide the per-device batch '
                            f'{per_device} (config.batch_size={config.batch_size} over {devices} devices): '
                            'each device splits its rows into that many equal micro-batches; use a divisor '
                            f'of {per_device}.')
  if config.model.image_size % config.model.image.patch_size:
    raise errors.InputError(f'config.model.image_size={config.model.image_size} is not a multiple of '
                            f'config.model.image.patch_size={config.model.image.patch_size}.')
  if config.model.image.pool not in encoders.POOLS:
    raise errors.InputError(f'config.model.image.pool={config.model.image.pool!r} is not one of {encoders.POOLS}.')
  for tower in ('image', 'text'):
    width, heads = config.model[tower].width, config.model[tower].num_heads
    if width % heads:
      raise errors.InputError(f'config.model.{tower}.width={width} is not divisible by num_heads={heads}.')
  remat_choices = tuple(encoders.REMAT_POLICIES)
  settings.check_field(config.model.remat in remat_choices, 'model.remat', config.model.remat,
                       f'is not one of {remat_choices}')
  video.validate_config(config.model)
  evaluate.validate_config(config)
  eval_sets.names(config)  # Names and empty elements of config.eval.datasets; their data is checked later.
  settings.StepSettings.from_config(config)
  if config.mvlm.mvm_weight:
    validate_visual_tokenizer(config)
  validate_text_tower(config)


def validate_text_tower(config: ml_collections.ConfigDict) -> None:
  """Checks config.model.text.architecture and the BERT checkpoint it may start from."""
  text = config.model.text
  if text.architecture not in TEXT_ARCHITECTURES:
    raise errors.InputError(f'config.model.text.architecture={text.architecture!r} is not one of {TEXT_ARCHITECTURES}.')
  if not text.init_checkpoint:
    return
  if text.architecture != 'bert':
    raise errors.InputError(f'config.model.text.init_checkpoint={text.init_checkpoint!r} is a BERT '
                            "checkpoint, which fits only config.model.text.architecture='bert' "
                            f'(not {text.architecture!r}).')
  try:
    folder = pretrained.bert_checkpoint_folder(text.init_checkpoint)
  except FileNotFoundError as e:
    raise errors.InputError(f'config.model.text.init_checkpoint: {e}') from None
  # The checkpoint's word embeddings are rows of its vocab.txt: the tokenizer must read the same ids.
  checkpoint_vocab = f'{folder}/vocab.txt'
  if not files.path(checkpoint_vocab).exists():
    return
  if not config.data.vocab_file:
    raise errors.InputError(f'config.model.text.init_checkpoint={text.init_checkpoint!r} with an empty '
                            f'config.data.vocab_file: a vocabulary trained on the captions would not match the '
                            f"checkpoint's word embeddings. Set config.data.vocab_file={checkpoint_vocab!r}.")
  if pretrained.gfile().exists(config.data.vocab_file):
    with pretrained.gfile().GFile(checkpoint_vocab) as f:
      expected = f.read().splitlines()
    with pretrained.gfile().GFile(config.data.vocab_file) as f:
      actual = f.read().splitlines()
    rows = min(len(expected), len(actual))
    if expected[:rows] != actual[:rows]:
      raise errors.InputError(f'config.data.vocab_file={config.data.vocab_file!r} differs from the vocab.txt of '
                              f'config.model.text.init_checkpoint ({checkpoint_vocab}): the token ids would index '
                              'the wrong rows of its word embeddings. Use that vocab.txt (extending it at the end is '
                              'fine).')


def validate_visual_tokenizer(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field when config.visual_tokenizer cannot train or serve codes."""
  vt = config.visual_tokenizer
  if config.model.image_size % config.model.image.patch_size:
    raise errors.InputError(f'config.model.image_size={config.model.image_size} is not a multiple of '
                            f'config.model.image.patch_size={config.model.image.patch_size}: the code grid is the '
                            'patch grid.')
  try:
    dvae.num_downsamplings(config.model.image.patch_size)
  except ValueError as e:
    raise errors.InputError(f'config.model.image.patch_size: {e}') from None
  settings.check_field(vt.codebook_size >= 2, 'visual_tokenizer.codebook_size', vt.codebook_size, 'must be >= 2')
  for name in ('hidden_dim', 'code_dim', 'batch_size', 'learning_rate', 'temperature_start', 'temperature_end',
               'log_every_steps', 'checkpoint_every_steps'):
    settings.check_field(vt[name] > 0, f'visual_tokenizer.{name}', vt[name], 'must be > 0')
  for name in ('num_train_steps', 'warmup_steps', 'num_res_blocks', 'kl_weight', 'weight_decay'):
    settings.check_field(vt[name] >= 0, f'visual_tokenizer.{name}', vt[name], 'must be >= 0')
  if vt.temperature_end > vt.temperature_start:
    raise errors.InputError(f'config.visual_tokenizer.temperature_end={vt.temperature_end} must be <= '
                            f'temperature_start={vt.temperature_start} (the temperature is annealed down).')
  settings.check_field(vt.eval_split in TOKENIZER_SPLITS, 'visual_tokenizer.eval_split', vt.eval_split,
         f'is not one of {TOKENIZER_SPLITS}')
  if vt.batch_size % jax.device_count():
    raise errors.InputError(f'config.visual_tokenizer.batch_size={vt.batch_size} is not divisible by the '
                            f'{jax.device_count()} devices; use a multiple of {jax.device_count()}.')


def may_change_on_resume(key: str) -> bool:
  return any(key == f or (f.endswith('.') and key.startswith(f)) for f in RESUMABLE_FIELDS)


def check_workdir_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Records the config in WORKDIR/config.json, or checks it against the one a previous run recorded there."""
  checkpointing.check_recorded(files.path(workdir) / CONFIG_FILE, json.loads(json.dumps(flatten(config))),
                               may_change_on_resume, 'a run')
