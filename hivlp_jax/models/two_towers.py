"""Two-tower image-text model: a ViT image tower and a Transformer text tower, no fusion.

`TwoTowers(images, texts)` returns (image_embedding, text_embedding, extras). The embeddings are the full
nested-head projections [B, embed_dim], unnormalised; `matryoshka.normalized_prefix` reads them at any
nested dim. Either input may be None, so evaluation embeds images and texts separately.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from hivlp_jax.models import matryoshka

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
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, dtype=self.dtype, name=f'block{i}')(x, mask)
    return nn.LayerNorm(dtype=self.dtype, name='norm')(x)


class ViT(nn.Module):
  """Images [B, H, W, 3] float -> pooled [B, width] ([CLS] token) and tokens [B, 1 + patches, width]."""
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype, name='patch_embed')(images)
    batch, grid_h, grid_w, _ = x.shape
    x = x.reshape(batch, grid_h * grid_w, self.width)
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


def preprocess_images(images: jnp.ndarray, image_size: int) -> jnp.ndarray:
  """uint8 [B, H, W, 3] -> float32 [B, image_size, image_size, 3] in [-1, 1]."""
  x = images.astype(jnp.float32) / 127.5 - 1.0
  if x.shape[1:3] != (image_size, image_size):
    x = jax.image.resize(x, (x.shape[0], image_size, image_size, 3), 'bilinear')
  return x


class TwoTowers(nn.Module):
  """ViT + text Transformer, each pooled and projected by a nested (Matryoshka) head."""
  config: ml_collections.ConfigDict  # config.model
  vocab_size: int

  def setup(self):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    self.image_tower = ViT(cfg.image.patch_size, cfg.image.width, cfg.image.depth, cfg.image.num_heads,
                           cfg.image.mlp_dim, dtype=dtype)
    self.text_tower = TextTransformer(self.vocab_size, cfg.text.max_len, cfg.text.width, cfg.text.depth,
                                      cfg.text.num_heads, cfg.text.mlp_dim, dtype=dtype)
    self.image_head = matryoshka.NestedProjection(cfg.embed_dim, dtype=dtype)
    self.text_head = matryoshka.NestedProjection(cfg.embed_dim, dtype=dtype)
    self.log_temperature = self.param(
        'log_temperature', nn.initializers.constant(jnp.log(cfg.temperature_init)), ())

  def temperature(self) -> jnp.ndarray:
    return jnp.clip(jnp.exp(self.log_temperature), self.config.temperature_min, self.config.temperature_max)

  def embed_images(self, images: jnp.ndarray) -> jnp.ndarray:
    """uint8 [B, H, W, 3] -> float32 [B, embed_dim]."""
    pooled, _ = self.image_tower(preprocess_images(images, self.config.image_size))
    return self.image_head(pooled).astype(jnp.float32)

  def embed_texts(self, tokens: jnp.ndarray) -> jnp.ndarray:
    """int32 [B, L] -> float32 [B, embed_dim]."""
    pooled, _ = self.text_tower(tokens)
    return self.text_head(pooled).astype(jnp.float32)

  def __call__(self, images: Optional[jnp.ndarray] = None, texts: Optional[jnp.ndarray] = None):
    image_embedding = None if images is None else self.embed_images(images)
    text_embedding = None if texts is None else self.embed_texts(texts)
    return image_embedding, text_embedding, {'temperature': self.temperature()}
