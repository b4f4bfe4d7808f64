"""Videos through the image tower: its weights embed every frame, a temporal aggregator pools the frames.

`TwoTowers` runs a clip uint8 [B, T, H, W, 3] as B*T images through the ViT, aggregates the T pooled frame
features [B, T, width] into one [B, width] here, and projects that with the image tower's nested head, so a
video embedding is read and trained exactly like an image embedding. config.model.video.temporal chooses:
- 'mean': the mean of the frames (CLIP4Clip meanP). No parameters, blind to frame order.
- 'transformer': CLIP4Clip seqTransf. `TemporalTransformer`, a small pre-LN Transformer over the T frame
  tokens with learned frame-position embeddings, residual to the mean:
  mean_t(x_t) + mean_t(Encoder(x + pos)_t). Its params (`temporal` in the model) exist only with this choice.
  config.model.video.patch_grid = g > 0 also gives it each frame's patch tokens average-pooled to g x g cells,
  so it sees where things are in each frame, not only each frame's pooled [CLS]: T * (1 + g^2) tokens, with
  learned frame and cell positions.
  config.model.video.frame_differences also runs the T - 1 differences of consecutive (preprocessed) frames
  through the image tower (TSN's RGB difference): a moving object leaves its colour ahead of it and the
  background behind, so the direction of motion is in one image, where frame features that carry no position
  cannot show it. The Transformer gets their pooled features as T - 1 more tokens with their own positions.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from hivlp_jax import errors
from hivlp_jax.models import encoders

Dtype = Any
TEMPORAL = ('mean', 'transformer')  # config.model.video.temporal.


def validate_config(model_config: ml_collections.ConfigDict) -> None:
  """Raises errors.InputError naming the config.model.video field that cannot build a video tower."""
  video, width = model_config.video, model_config.image.width
  if video.temporal not in TEMPORAL:
    raise errors.InputError(f'config.model.video.temporal={video.temporal!r} is not one of {TEMPORAL}.')
  for name in ('depth', 'num_frames'):
    if video[name] < 1:
      raise errors.InputError(f'config.model.video.{name}={video[name]!r} must be >= 1.')
  grid = model_config.image_size // model_config.image.patch_size
  patch_grid = video.patch_grid
  if patch_grid < 0 or (patch_grid and (grid % patch_grid or video.temporal != 'transformer')):
    raise errors.InputError(f'config.model.video.patch_grid={patch_grid!r} must be 0, or with '
                            f"temporal='transformer' divide the {grid} x {grid} patch grid of the image tower.")
  if video.frame_differences and (video.temporal != 'transformer' or patch_grid or video.num_frames < 2):
    raise errors.InputError("config.model.video.frame_differences=True needs temporal='transformer', "
                            f'patch_grid=0 and num_frames >= 2 (now {video.temporal!r}, {patch_grid}, '
                            f'{video.num_frames}).')
  heads = temporal_heads(model_config)
  if video.num_heads < 0 or width % heads:
    raise errors.InputError(f'config.model.video.num_heads={video.num_heads!r} must be >= 0 (0: the image '
                            f"tower's {model_config.image.num_heads}) and divide config.model.image.width={width}.")


def temporal_heads(model_config: ml_collections.ConfigDict) -> int:
  """The temporal Transformer's attention heads: config.model.video.num_heads, 0 meaning the image tower's."""
  return model_config.video.num_heads or model_config.image.num_heads


class TemporalTransformer(nn.Module):
  """Frame features [B, T, W] (T <= max_frames) -> clip features [B, W]: the mean plus the averaged output
  of an `encoders.Encoder` over the frames with learned frame-position embeddings.

  The Encoder's final LayerNorm keeps the residual branch at the scale of the frame features (the ViT's
  pooled [CLS] is LayerNorm-ed too), so neither term swamps the other at the start.
  """
  max_frames: int
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  remat: str = 'none'  # Encoder.remat.
  scan_layers: bool = False  # Encoder.scan_layers.

  cells_per_frame: int = 0  # g^2 with config.model.video.patch_grid = g; 0: the frames' [CLS] only.
  frame_differences: bool = False  # config.model.video.frame_differences.

  @nn.compact
  def __call__(self, frames, cells=None, differences=None):
    """frames [B, T, W]; cells [B, T, cells_per_frame, W] when cells_per_frame > 0; differences [B, T - 1, W],
    the pooled features of the frame differences, with frame_differences."""
    num_frames, width = frames.shape[1:]
    if num_frames > self.max_frames:
      raise errors.InputError(f'A clip of {num_frames} frames is longer than config.model.video.num_frames='
                              f'{self.max_frames}, the frame positions the temporal Transformer learns.')
    # Named like the towers' position embeddings, so weight decay leaves it alone (train_step.NO_DECAY).
    pos = self.param('pos_embedding', nn.initializers.normal(0.02), (1, self.max_frames, width))
    x = frames + pos[:, :num_frames].astype(frames.dtype)
    if self.cells_per_frame:  # Each frame's [CLS] then its cells, with a learned position per cell.
      cell_pos = self.param('cell_pos_embedding', nn.initializers.normal(0.02), (1, 1, self.cells_per_frame, width))
      cells = cells + pos[:, :num_frames, None].astype(cells.dtype) + cell_pos.astype(cells.dtype)
      x = jnp.concatenate([x[:, :, None], cells], axis=2).reshape(x.shape[0], -1, width)
    if self.frame_differences:  # Frame t+1 - frame t gets a position of its own, after the frames.
      diff_pos = self.param('difference_pos_embedding', nn.initializers.normal(0.02),
                            (1, self.max_frames - 1, width))
      x = jnp.concatenate([x, differences + diff_pos[:, :num_frames - 1].astype(differences.dtype)], axis=1)
    x = encoders.Encoder(self.depth, self.num_heads, self.mlp_dim, dtype=self.dtype, remat=self.remat,
                         scan_layers=self.scan_layers, name='encoder')(x)
    return jnp.mean(frames, axis=1) + jnp.mean(x, axis=1)


def aggregate(frames: jnp.ndarray, transformer: TemporalTransformer = None, cells=None,
              differences=None) -> jnp.ndarray:
  """Frame features [B, T, W] (and cells [B, T, C, W], differences [B, T - 1, W]) -> clip features [B, W]:
  the mean of the frames, or `transformer`'s output when given."""
  return jnp.mean(frames, axis=1) if transformer is None else transformer(frames, cells, differences)


def with_differences(clips: jnp.ndarray) -> jnp.ndarray:
  """Preprocessed clips [B, T, S, S, 3] -> [B, 2T - 1, S, S, 3]: the frames, then frame t+1 - frame t."""
  return jnp.concatenate([clips, clips[:, 1:] - clips[:, :-1]], axis=1)


def patch_cells(tokens: jnp.ndarray, grid: int) -> jnp.ndarray:
  """ViT patch tokens [N, P, W] (a square grid of P patches in row order) -> [N, grid^2, W], the patches
  average-pooled to grid x grid cells."""
  side = int(round(tokens.shape[1] ** 0.5))
  patches = tokens.reshape(tokens.shape[0], grid, side // grid, grid, side // grid, tokens.shape[-1])
  return jnp.mean(patches, axis=(2, 4)).reshape(tokens.shape[0], grid * grid, tokens.shape[-1])
