"""Hugging Face checkpoints (`model.safetensors` + `config.json`), read with safetensors, no TensorFlow, and
renamed to the names of the checkpoints `pretrained` already loads: BERT's TF names, the ViT `.npz` names.

PyTorch's Linear stores weights [out, in]: they become kernels [in, out]; a convolution's [out, in, h, w]
becomes [h, w, in, out]. Splitting attention kernels into heads is left to the loaders (a reshape).
"""

import re

import numpy as np

from hivlp_jax import errors
from hivlp_jax import files

WEIGHTS = 'model.safetensors'  # Hugging Face's weights file, beside its config.json (and vocab.txt for BERT).

# ViT (google/vit-base-patch16-224-in21k) -> the public .npz names.
_VIT_RENAMES = (
    (r'^embeddings\.cls_token$', 'cls'),
    (r'^embeddings\.position_embeddings$', 'Transformer/posembed_input/pos_embedding'),
    (r'^embeddings\.patch_embeddings\.projection\.', 'embedding/'),
    (r'^encoder\.layer\.(\d+)\.layernorm_before\.', r'Transformer/encoderblock_\1/LayerNorm_0/'),
    (r'^encoder\.layer\.(\d+)\.layernorm_after\.', r'Transformer/encoderblock_\1/LayerNorm_2/'),
    (r'^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.',
     r'Transformer/encoderblock_\1/MultiHeadDotProductAttention_1/\2/'),
    (r'^encoder\.layer\.(\d+)\.attention\.output\.dense\.',
     r'Transformer/encoderblock_\1/MultiHeadDotProductAttention_1/out/'),
    (r'^encoder\.layer\.(\d+)\.intermediate\.dense\.', r'Transformer/encoderblock_\1/MlpBlock_3/Dense_0/'),
    (r'^encoder\.layer\.(\d+)\.output\.dense\.', r'Transformer/encoderblock_\1/MlpBlock_3/Dense_1/'),
    (r'^layernorm\.', 'Transformer/encoder_norm/'),
)


def is_folder(path: str) -> bool:
  """Whether `path` is a folder holding a Hugging Face `model.safetensors`."""
  return files.path(path).is_dir() and (files.path(path) / WEIGHTS).exists()


def _load(path: str) -> dict[str, np.ndarray]:
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  try:
    return safetensors_numpy.load(files.path(path).read_bytes())
  except Exception as e:  # pylint: disable=broad-except  # safetensors raises its own error types.
    raise errors.InputError(f'{path} is not a readable safetensors file ({type(e).__name__}: {e}).') from None


def bert_name(hf_name: str) -> str:
  """A Hugging Face BERT name -> the TF checkpoint's: 'bert.encoder.layer.3.attention.self.query.weight'
  -> 'bert/encoder/layer_3/attention/self/query/kernel' ('LayerNorm.weight' / '.bias' -> gamma / beta;
  'bert.' is optional, as in `BertModel` files). The pre-training heads ('cls.') keep their names."""
  if hf_name.startswith('cls.'):
    return hf_name
  name = re.sub(r'\.layer\.(\d+)\.', r'.layer_\1.', hf_name.removeprefix('bert.')).replace('.', '/')
  parent, _, leaf = name.rpartition('/')
  if parent.endswith('LayerNorm'):
    leaf = {'weight': 'gamma', 'bias': 'beta'}.get(leaf, leaf)
  elif parent.endswith('_embeddings') and leaf == 'weight':
    return f'bert/{parent}'
  elif leaf == 'weight':
    leaf = 'kernel'
  return f'bert/{parent}/{leaf}'


def bert_arrays(path: str) -> dict:
  """{TF checkpoint name: () -> array} of a Hugging Face BERT `model.safetensors`."""
  arrays = {}
  for hf_name, value in _load(path).items():
    name = bert_name(hf_name)
    arrays[name] = (lambda v=(value.T if name.endswith('/kernel') else value): np.asarray(v))
  return arrays


def vit_name(hf_name: str) -> str:
  """A Hugging Face ViT name -> the public `.npz` name ('weight' of a norm -> 'scale', else 'kernel');
  names outside the mapping (the pooler) come back as they are, to be reported unused."""
  name = hf_name.removeprefix('vit.')
  for pattern, replacement in _VIT_RENAMES:
    renamed, count = re.subn(pattern, replacement, name)
    if count:
      parent, _, leaf = renamed.rpartition('/')
      if leaf == 'weight':
        leaf = 'scale' if 'LayerNorm' in parent or 'encoder_norm' in parent else 'kernel'
      return f'{parent}/{leaf}' if parent else renamed
  return hf_name


def vit_arrays(path: str) -> dict[str, np.ndarray]:
  """{.npz name: array} of a Hugging Face ViT `model.safetensors`, kernels in the .npz layout."""
  arrays = {}
  for hf_name, value in _load(path).items():
    name = vit_name(hf_name)
    if name.endswith('/kernel'):
      value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T  # Conv [O, I, H, W] -> [H, W, I, O].
    arrays[name] = value
  return arrays
