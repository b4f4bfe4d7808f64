"""Initialise the image tower from a public ViT checkpoint (`.npz` of the google-research/big_vision layout).

Names in the checkpoint -> names in `two_towers.ViT`:
  embedding/{kernel,bias}                               -> patch_embed/{kernel,bias}
  cls                                                   -> cls
  Transformer/posembed_input/pos_embedding              -> pos_embedding (resized to the model's grid)
  Transformer/encoderblock_i/LayerNorm_0                -> encoder/block{i}/LayerNorm_0
  Transformer/encoderblock_i/MultiHeadDotProductAttention_1 -> encoder/block{i}/MultiHeadDotProductAttention_0
  Transformer/encoderblock_i/LayerNorm_2                -> encoder/block{i}/LayerNorm_1
  Transformer/encoderblock_i/MlpBlock_3/Dense_{0,1}     -> encoder/block{i}/MlpBlock_0/Dense_{0,1}
  Transformer/encoder_norm                              -> encoder/norm
The classification head (head/, pre_logits/) has no counterpart and is reported as unused.
"""

import dataclasses
import re

import flax
import jax
import numpy as np

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


def vit_name(checkpoint_name: str) -> str:
  for pattern, replacement in _RENAMES:
    name, count = re.subn(pattern, replacement, checkpoint_name)
    if count:
      return name
  return checkpoint_name


def resize_position_embedding(posemb: np.ndarray, num_tokens: int) -> np.ndarray:
  """[1, 1 + g*g, W] -> [1, num_tokens, W]: the [CLS] row kept, the g x g grid resized bilinearly."""
  cls, grid = posemb[:, :1], posemb[0, 1:]
  old, new = int(round(np.sqrt(grid.shape[0]))), int(round(np.sqrt(num_tokens - 1)))
  if old * old != grid.shape[0] or new * new != num_tokens - 1:
    raise ValueError(f'Position embeddings of {grid.shape[0]} and {num_tokens - 1} patches are not square grids.')
  grid = jax.image.resize(grid.reshape(old, old, -1), (new, new, grid.shape[-1]), 'bilinear')
  return np.concatenate([cls, np.asarray(grid).reshape(1, new * new, -1)], axis=1)


def load_vit_npz(path: str, image_tower_params) -> tuple[dict, LoadReport]:
  """Returns the image tower's params with every matching checkpoint array copied in, and a report."""
  flat = {'/'.join(k): v for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(image_tower_params)).items()}
  report = LoadReport()
  with np.load(path) as checkpoint:
    for checkpoint_name in checkpoint.files:
      name = vit_name(checkpoint_name)
      if name not in flat:
        report.unused.append(checkpoint_name)
        continue
      value, target = checkpoint[checkpoint_name], flat[name]
      if name == 'pos_embedding' and value.shape != target.shape:
        value = resize_position_embedding(value, target.shape[1])
        report.reshaped.append(f'{name} {checkpoint[checkpoint_name].shape} -> {value.shape}')
      if value.shape != target.shape:
        raise ValueError(f'{checkpoint_name} in {path} has shape {value.shape}, the model wants {target.shape} '
                         f'at {name}: the checkpoint is of another model size.')
      flat[name] = value.astype(np.asarray(target).dtype)
      report.loaded.append(name)
  report.left_new = sorted(set(flat) - set(report.loaded))
  params = flax.traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})
  return params, report
