"""Initialise the towers from public checkpoints: a ViT `.npz` (google-research/big_vision layout) into the
image tower, and Google's original TF BERT checkpoint into the 'bert' text tower (`load_bert_checkpoint`).

Names in the checkpoint -> names in `encoders.ViT`:
  embedding/{kernel,bias}                               -> patch_embed/{kernel,bias}
  cls                                                   -> cls
  Transformer/posembed_input/pos_embedding              -> pos_embedding (resized to the model's grid)
  Transformer/encoderblock_i/LayerNorm_0                -> encoder/block{i}/LayerNorm_0
  Transformer/encoderblock_i/MultiHeadDotProductAttention_1 -> encoder/block{i}/MultiHeadDotProductAttention_0
  Transformer/encoderblock_i/LayerNorm_2                -> encoder/block{i}/LayerNorm_1
  Transformer/encoderblock_i/MlpBlock_3/Dense_{0,1}     -> encoder/block{i}/MlpBlock_0/Dense_{0,1}
  Transformer/encoder_norm                              -> encoder/norm
The classification head (head/, pre_logits/) has no counterpart and is reported as unused.
Towers with scanned blocks (config.model.scan_layers, params stacked under encoder/blocks) are loaded in the
unscanned layout, block by block, and stacked back: names in reports are always encoder/block{i}/...
"""

import dataclasses
import functools
import json
import re

import flax
import jax
import numpy as np

from hivlp_jax import errors
from hivlp_jax import files
from hivlp_jax.models import encoders
from hivlp_jax.models import hf_weights


def _tensorflow():
  """TensorFlow, imported on first use: it reads the checkpoints (seconds and 700 MiB to import)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf


def gfile():
  """tf.io.gfile: local, gs:// and other file systems."""
  return _tensorflow().io.gfile


_RENAMES = (
    (r'^embedding/', 'patch_embed/'),
    (r'^Transformer/posembed_input/pos_embedding$', 'pos_embedding'),
    (r'^Transformer/encoderblock_(\d+)/MultiHeadDotProductAttention_1/', r'encoder/block\1/MultiHeadDotProductAttention_0/'),
    (r'^Transformer/encoderblock_(\d+)/LayerNorm_2/', r'encoder/block\1/LayerNorm_1/'),
    (r'^Transformer/encoderblock_(\d+)/LayerNorm_0/', r'encoder/block\1/LayerNorm_0/'),
    (r'^Transformer/encoderblock_(\d+)/MlpBlock_3/', r'encoder/block\1/MlpBlock_0/'),
    (r'^Transformer/encoder_norm/', 'encoder/norm/'),
)


@dataclasses.dataclass
class LoadReport:
  loaded: list[str] = dataclasses.field(default_factory=list)
  reshaped: list[str] = dataclasses.field(default_factory=list)  # e.g. position embeddings resized.
  left_new: list[str] = dataclasses.field(default_factory=list)  # In the model, not in the checkpoint.
  unused: list[str] = dataclasses.field(default_factory=list)  # In the checkpoint, not in the model.

  def __str__(self) -> str:
    return (f'loaded {len(self.loaded)}, reshaped {self.reshaped}, left new {self.left_new}, '
            f'unused {self.unused}')


def flat_unscanned(tower_params) -> dict:
  """A params tree (a tower's, or the whole model's) as {'encoder/block0/...': array}, scanned blocks unstacked."""
  params = encoders.unstack_layers(flax.core.unfreeze(tower_params))
  return {'/'.join(k): v for k, v in flax.traverse_util.flatten_dict(params).items()}


def unflatten_like(flat: dict, tower_params) -> dict:
  """The inverse of `flat_unscanned`: stacked again when `tower_params` has scanned blocks."""
  params = flax.traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})
  return encoders.stack_layers(params) if encoders.has_scanned_layers(tower_params) else params


def vit_name(checkpoint_name: str) -> str:
  for pattern, replacement in _RENAMES:
    name, count = re.subn(pattern, replacement, checkpoint_name)
    if count:
      return name
  return checkpoint_name


def _is_square(n: int) -> bool:
  return n > 0 and int(round(np.sqrt(n))) ** 2 == n


def resize_position_embedding(posemb: np.ndarray, num_tokens: int) -> np.ndarray:
  """[1, (1 +) g*g, W] -> [1, num_tokens, W]: the g x g grid resized bilinearly; the [CLS] row kept when both
  have one, dropped for a model pooled without [CLS] (pool 'gap': num_tokens a square), added as zeros for
  one with [CLS] from one without."""
  has_cls, wants_cls = not _is_square(posemb.shape[1]), not _is_square(num_tokens)
  grid = posemb[0, int(has_cls):]
  cells = num_tokens - int(wants_cls)
  if not (_is_square(grid.shape[0]) and _is_square(cells)):
    raise errors.InputError(f'Position embeddings of {grid.shape[0]} and {cells} patches are not square grids.')
  old, new = int(round(np.sqrt(grid.shape[0]))), int(round(np.sqrt(cells)))
  grid = np.asarray(jax.image.resize(grid.reshape(old, old, -1), (new, new, grid.shape[-1]), 'bilinear'))
  cls = posemb[:, :1] if has_cls else np.zeros_like(posemb[:, :1])
  return np.concatenate([cls, grid.reshape(1, new * new, -1)] if wants_cls else [grid.reshape(1, new * new, -1)],
                        axis=1)


def load_vit_npz(path: str, image_tower_params) -> tuple[dict, LoadReport]:
  """Returns the image tower's params with every matching checkpoint array copied in, and a report.

  path: a public ViT `.npz` (big_vision / vision_transformer names), or a Hugging Face folder
  (`model.safetensors`, e.g. google/vit-base-patch16-224-in21k; `hf_weights.vit_arrays` renames it)."""
  flat = flat_unscanned(image_tower_params)
  report = LoadReport()
  if hf_weights.is_folder(path):
    arrays = hf_weights.vit_arrays(str(files.path(path) / hf_weights.WEIGHTS))
  else:
    with files.path(path).open('rb') as f, np.load(f) as checkpoint:
      arrays = {name: checkpoint[name] for name in checkpoint.files}
  for checkpoint_name, value in arrays.items():
    name = vit_name(checkpoint_name)
    if name not in flat:
      report.unused.append(checkpoint_name)
      continue
    target = flat[name]
    if name == 'pos_embedding' and value.shape != target.shape:
      value = resize_position_embedding(value, target.shape[1])
      report.reshaped.append(f'{name} {arrays[checkpoint_name].shape} -> {value.shape}')
    elif '/MultiHeadDotProductAttention_0/' in name and value.size == np.size(target):
      value = value.reshape(np.shape(target))  # Hugging Face's [W, W]: only the split into heads.
    if value.shape != target.shape:
      raise errors.InputError(f'{checkpoint_name} in {path} has shape {value.shape}, the model wants {target.shape} '
                              f'at {name}: the checkpoint is of another model size.')
    flat[name] = value.astype(np.asarray(target).dtype)
    report.loaded.append(name)
  report.left_new = sorted(set(flat) - set(report.loaded))
  return unflatten_like(flat, image_tower_params), report


# BERT: names in the TF checkpoint (below 'bert/') -> names in `bert.BertTextTransformer`.
_BERT_RENAMES = (
    (r'^embeddings/word_embeddings$', 'token_embedding/embedding'),
    (r'^embeddings/position_embeddings$', 'pos_embedding'),
    (r'^embeddings/token_type_embeddings$', 'type_embedding'),
    (r'^embeddings/LayerNorm/', 'embedding_norm/'),
    (r'^encoder/layer_(\d+)/attention/self/(query|key|value)/', r'encoder/block\1/attention/\2/'),
    (r'^encoder/layer_(\d+)/attention/output/dense/', r'encoder/block\1/attention/out/'),
    (r'^encoder/layer_(\d+)/attention/output/LayerNorm/', r'encoder/block\1/attention_norm/'),
    (r'^encoder/layer_(\d+)/intermediate/dense/', r'encoder/block\1/intermediate/'),
    (r'^encoder/layer_(\d+)/output/dense/', r'encoder/block\1/output/'),
    (r'^encoder/layer_(\d+)/output/LayerNorm/', r'encoder/block\1/output_norm/'),
)
_LAYER_NORM_RENAMES = {'gamma': 'scale', 'beta': 'bias'}
BERT_CHECKPOINT_NAME = 'bert_model.ckpt'  # The prefix of the .index / .data-* files in Google's releases.


def bert_name(checkpoint_name: str) -> str:
  """'bert/encoder/layer_3/attention/self/query/kernel' -> 'encoder/block3/attention/query/kernel'.

  Names outside the mapping (the pooler, the pre-training heads 'cls/...', 'global_step') come back as they
  are, so that they are reported as unused.
  """
  if not checkpoint_name.startswith('bert/'):
    return checkpoint_name
  for pattern, replacement in _BERT_RENAMES:
    name, count = re.subn(pattern, replacement, checkpoint_name[len('bert/'):])
    if count:
      parent, _, leaf = name.rpartition('/')
      return f'{parent}/{_LAYER_NORM_RENAMES[leaf]}' if leaf in _LAYER_NORM_RENAMES else name
  return checkpoint_name


def bert_checkpoint_prefix(path: str) -> str:
  """The TF checkpoint prefix ('.../bert_model.ckpt') of `path`: that prefix itself or the folder holding it.

  Raises FileNotFoundError naming what was looked for.
  """
  prefix = path.removesuffix('.index')
  if gfile().isdir(prefix):
    prefix = f'{prefix.rstrip("/")}/{BERT_CHECKPOINT_NAME}'
  if not gfile().exists(prefix + '.index'):
    raise errors.MissingInputError(
        f'No BERT checkpoint at {path!r}: found no {prefix}.index (TF) nor {hf_weights.WEIGHTS} (Hugging Face). '
        f"Give the checkpoint prefix (the '{BERT_CHECKPOINT_NAME}' of Google's released bert_model.ckpt.index / "
        f'.data-00000-of-00001 files), the folder holding it, or a Hugging Face folder ({hf_weights.WEIGHTS} + '
        'config.json).')
  return prefix


def _check_bert_config(config_file: str, flat_params: dict) -> None:
  """Checks the checkpoint's config (bert_config.json, or Hugging Face's config.json), when there is one,
  against the tower.

  The number of heads is not in any array's shape, so a mismatch would load without error and compute
  another function: refuse it here.
  """
  if not files.path(config_file).exists():
    return
  bert_config = json.loads(files.path(config_file).read_text())
  query = flat_params.get('encoder/block0/attention/query/kernel')  # [W, heads, head_dim]
  heads = bert_config.get('num_attention_heads') if query is None else query.shape[1]
  if bert_config.get('num_attention_heads', heads) != heads:
    raise errors.InputError(f'{config_file} has num_attention_heads={bert_config["num_attention_heads"]} but the text '
                            f'tower has {heads} heads: set config.model.text.num_heads to match.')
  if bert_config.get('hidden_act', 'gelu') != 'gelu':
    raise errors.InputError(f'{config_file} has hidden_act={bert_config["hidden_act"]!r}; the bert text tower '
                            'uses gelu.')


def load_bert_checkpoint(path: str, text_params) -> tuple[dict, LoadReport]:
  """Returns the 'bert' text tower's params with the arrays of a BERT checkpoint copied in, and a report.

  path: a Hugging Face folder (`model.safetensors` + `config.json`, as `bert-base-uncased` is published;
  read with safetensors, no TensorFlow) or a TF checkpoint: its prefix ('.../bert_model.ckpt') or its
  folder, as Google released BERT-base (with vocab.txt and bert_config.json beside it). Layout changes: the
  query/key/value kernels [W, W] are split into heads as [W, heads, head_dim] (biases [heads, head_dim])
  and the attention output kernel into [heads, head_dim, W]; these count as loaded. Shape changes are
  listed in `reshaped`:
  - position embeddings [512, W] -> the first max_len rows, as [1, max_len, W];
  - token-type embeddings [2, W] -> the row of type 0 (one segment);
  - word embeddings [V, W] -> the model's vocabulary [V', W]: the first min(V, V') rows are copied (the
    token ids must mean the same, i.e. the tokenizer reads the checkpoint's vocab.txt, maybe extended at
    the end); rows past V stay as initialised.
  Blocks the checkpoint has beyond the tower's depth are unused (a truncated BERT, as ALBEF's text encoder
  uses BERT's first 6 layers); blocks the tower has beyond it are left new.
  """
  flat = flat_unscanned(text_params)
  if 'type_embedding' not in flat or 'embedding_norm/scale' not in flat:
    raise errors.InputError('A BERT checkpoint fits only the BERT text tower: set '
                            "config.model.text.architecture='bert' "
                            f"(these params have no 'type_embedding' / 'embedding_norm': {sorted(flat)[:4]} ...).")
  if hf_weights.is_folder(path):
    source, config_file = str(files.path(path) / hf_weights.WEIGHTS), str(files.path(path) / 'config.json')
    arrays = hf_weights.bert_arrays(source)
  else:
    source = bert_checkpoint_prefix(path)
    config_file = f'{source.rpartition("/")[0] or "."}/bert_config.json'
    reader = _tensorflow().train.load_checkpoint(source)
    arrays = {name: functools.partial(reader.get_tensor, name) for name in reader.get_variable_to_shape_map()}
  _check_bert_config(config_file, flat)
  report = LoadReport()
  for checkpoint_name in sorted(arrays):
    name = bert_name(checkpoint_name)
    if name not in flat:
      report.unused.append(checkpoint_name)
      continue
    value, target = np.asarray(arrays[checkpoint_name]()), np.asarray(flat[name])
    shape = value.shape
    if name == 'pos_embedding' and shape[-1:] == target.shape[-1:]:
      if shape[0] < target.shape[1]:
        raise errors.InputError(f'{checkpoint_name} in {source} has {shape[0]} positions, fewer than the text tower '
                                f'has (config.model.text.max_len={target.shape[1]}).')
      value = value[None, :target.shape[1]]
      if shape[0] != target.shape[1]:
        report.reshaped.append(f'{name} {shape} -> {value.shape}: the first {target.shape[1]} positions')
    elif name == 'type_embedding' and shape[-1:] == target.shape:
      value = value[0]
      report.reshaped.append(f'{name} {shape} -> {value.shape}: token type 0')
    elif name == 'token_embedding/embedding' and shape != target.shape and shape[1:] == target.shape[1:]:
      rows = min(shape[0], target.shape[0])
      value = np.concatenate([value[:rows], target[rows:]])
      report.reshaped.append(f'{name} {shape} -> {value.shape}: the first {rows} rows copied'
                             + (f', rows {rows}.. left new' if rows < target.shape[0] else ''))
    elif '/attention/' in name and value.size == target.size:
      value = value.reshape(target.shape)  # Only the split into heads: the element order stays.
    if value.shape != target.shape:
      raise errors.InputError(f'{checkpoint_name} in {source} has shape {value.shape}, the model wants {target.shape} '
                              f'at {name}: the checkpoint is of another model size.')
    flat[name] = value.astype(target.dtype)
    report.loaded.append(name)
  report.left_new = sorted(set(flat) - set(report.loaded))
  return unflatten_like(flat, text_params), report


def bert_checkpoint_folder(path: str) -> str:
  """The folder of a BERT checkpoint (Hugging Face's, or a TF prefix's), where its vocab.txt lies;
  MissingInputError when `path` is neither."""
  if hf_weights.is_folder(path):
    return path
  return bert_checkpoint_prefix(path).rpartition('/')[0] or '.'
