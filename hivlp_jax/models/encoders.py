"""The transformer encoders of the two towers: a ViT and a pre-LN text Transformer, and image preprocessing.

`two_towers.TwoTowers` puts a nested head on each; `bert.BertTextTransformer` is the post-LN text variant.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform())(x)
    x = nn.gelu(x)
    return nn.Dense(width, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform())(x)


class EncoderBlock(nn.Module):
  """Pre-LayerNorm Transformer block."""
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype,
                                        kernel_init=nn.initializers.xavier_uniform())(y, y, mask=mask)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype)(x)
    return x + MlpBlock(self.mlp_dim, dtype=self.dtype)(y)


class Encoder(nn.Module):
  """`depth` blocks (pre-LN `EncoderBlock` by default), then a LayerNorm unless `final_norm` is False."""
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  block: Any = None  # A block module class taking (num_heads, mlp_dim, dtype=, name=); None: EncoderBlock.
  final_norm: bool = True

  @nn.compact
  def __call__(self, x, mask=None):
    block = self.block or EncoderBlock
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_dim, dtype=self.dtype, name=f'block{i}')(x, mask)
    return nn.LayerNorm(dtype=self.dtype, name='norm')(x) if self.final_norm else x


class ViT(nn.Module):
  """Images [B, H, W, 3] float -> pooled [B, width] ([CLS] token) and tokens [B, 1 + patches, width].

  With `patch_mask` (bool [B, patches], for masked vision modeling) the masked patches' embeddings are
  replaced by a learned [MASK] embedding, as in BEiT; the module then needs `masked_patches=True`.
  """
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  masked_patches: bool = False

  @nn.compact
  def __call__(self, images, patch_mask=None):
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype, name='patch_embed')(images)
    batch, grid_h, grid_w, _ = x.shape
    x = x.reshape(batch, grid_h * grid_w, self.width)
    if self.masked_patches:
      mask_token = self.param('mask_token', nn.initializers.normal(0.02), (1, 1, self.width))
      if patch_mask is not None:
        x = jnp.where(patch_mask[..., None], mask_token.astype(x.dtype), x)
    cls = self.param('cls', nn.initializers.zeros, (1, 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)).astype(x.dtype), x], axis=1)
    pos = self.param('pos_embedding', nn.initializers.normal(0.02), (1, x.shape[1], self.width))
    x = x + pos.astype(x.dtype)
    x = Encoder(self.depth, self.num_heads, self.mlp_dim, dtype=self.dtype, name='encoder')(x)
    return x[:, 0], x


class TextTransformer(nn.Module):
  """Token ids [B, L] (0 = padding, [CLS] first) -> pooled [B, width] and tokens [B, L, width]."""
  vocab_size: int
  max_len: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                     name='token_embedding')
    x = embed(tokens).astype(self.dtype)
    pos = self.param('pos_embedding', nn.initializers.normal(0.02), (1, self.max_len, self.width))
    x = x + pos[:, :tokens.shape[1]].astype(x.dtype)
    mask = nn.make_attention_mask(tokens != 0, tokens != 0)
    x = Encoder(self.depth, self.num_heads, self.mlp_dim, dtype=self.dtype, name='encoder')(x, mask)
    return x[:, 0], x

  def attend(self, states: jnp.ndarray) -> jnp.ndarray:
    """Token states [..., width] -> vocabulary logits [..., vocab], through the input embedding (tied)."""
    embedding = self.variables['params']['token_embedding']['embedding']
    return states @ embedding.T.astype(states.dtype)


def preprocess_images(images: jnp.ndarray, image_size: int) -> jnp.ndarray:
  """uint8 [B, H, W, 3] -> float32 [B, image_size, image_size, 3] in [-1, 1]."""
  x = images.astype(jnp.float32) / 127.5 - 1.0
  if x.shape[1:3] != (image_size, image_size):
    x = jax.image.resize(x, (x.shape[0], image_size, image_size, 3), 'bilinear')
  return x
