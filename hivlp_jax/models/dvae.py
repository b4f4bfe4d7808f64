"""Discrete VAE visual tokenizer (DALL-E style): one code of a learned codebook per ViT patch.

The encoder downsamples by the ViT patch size with stride-2 convolutions, so its code grid is the patch
grid (image_size / patch_size per side: 4x4 for configs/default.py, 14x14 for configs/base_b16.py). Training
relaxes the categorical code with the Gumbel-softmax; `codes` takes the argmax, and masked vision modeling
predicts those ids.

  model = DiscreteVAE(image_size=32, patch_size=8, codebook_size=512)
  reconstruction, logits = model.apply(variables, images, rng=key, temperature=1.0)
  ids = model.apply(variables, images, method=model.codes)  # int32 [B, 4, 4]
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from hivlp_jax import errors
from hivlp_jax.models import encoders


def num_downsamplings(patch_size: int) -> int:
  """log2(patch_size): the stride-2 stages that map pixels to the patch grid."""
  stages = int(round(math.log2(patch_size))) if patch_size > 0 else -1
  if stages < 1 or 2**stages != patch_size:
    raise errors.InputError(f'The dVAE needs a patch size that is a power of 2 (>= 2), got {patch_size}.')
  return stages


class ResBlock(nn.Module):
  """Pre-activation residual block: x + conv3x3(relu(conv3x3(relu(x))))."""
  features: int

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(self.features, (3, 3))(nn.relu(x))
    # Zero-initialised last conv: each block starts as the identity, which steadies the first steps.
    y = nn.Conv(self.features, (3, 3))(nn.relu(y))
    return x + y


class Encoder(nn.Module):
  """Images float [B, H, W, 3] -> code logits [B, H / 2**stages, W / 2**stages, codebook_size]."""
  stages: int
  hidden_dim: int
  codebook_size: int
  num_res_blocks: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.stages):
      # Fewer channels at the higher resolutions: most of the cost of a conv net is there.
      features = max(self.hidden_dim // 2**(self.stages - 1 - i), 16)
      x = nn.Conv(features, (4, 4), strides=(2, 2), name=f'down{i}')(x if i == 0 else nn.relu(x))
    x = nn.Conv(self.hidden_dim, (3, 3), name='proj')(nn.relu(x))
    for i in range(self.num_res_blocks):
      x = ResBlock(self.hidden_dim, name=f'res{i}')(x)
    return nn.Conv(self.codebook_size, (1, 1), name='logits')(nn.relu(x))


class Decoder(nn.Module):
  """(Soft) one-hot codes [B, gh, gw, K] -> images float [B, gh * 2**stages, gw * 2**stages, 3]."""
  stages: int
  hidden_dim: int
  code_dim: int
  num_res_blocks: int

  @nn.compact
  def __call__(self, one_hot):
    # A one-hot row times this matrix is the code's embedding; a soft one mixes the embeddings.
    x = nn.Dense(self.code_dim, use_bias=False, kernel_init=nn.initializers.normal(1.0), name='codebook')(one_hot)
    x = nn.Conv(self.hidden_dim, (3, 3), name='proj')(x)
    for i in range(self.num_res_blocks):
      x = ResBlock(self.hidden_dim, name=f'res{i}')(x)
    for i in range(self.stages):
      features = max(self.hidden_dim // 2**(i + 1), 16)
      x = nn.ConvTranspose(features, (4, 4), strides=(2, 2), name=f'up{i}')(nn.relu(x))
    return nn.Conv(3, (3, 3), name='pixels')(nn.relu(x))


class DiscreteVAE(nn.Module):
  """Images uint8 [B, H, W, 3] <-> int32 codes [B, image_size / patch_size, image_size / patch_size].

  Images are preprocessed as the image tower's (`encoders.preprocess_images`): float in [-1, 1], resized
  to image_size. Reconstructions are in that space.
  """
  image_size: int
  patch_size: int
  codebook_size: int
  hidden_dim: int = 64  # Channels at the code grid; halved per upsampling stage (at least 16).
  code_dim: int = 64  # Width of a codebook entry.
  num_res_blocks: int = 1  # Residual blocks at the code grid, in the encoder and in the decoder.

  def setup(self):
    stages = num_downsamplings(self.patch_size)
    self.encoder = Encoder(stages, self.hidden_dim, self.codebook_size, self.num_res_blocks)
    self.decoder = Decoder(stages, self.hidden_dim, self.code_dim, self.num_res_blocks)
    # The training set's mean image, set by the training stage after init: the codes then describe what
    # differs from it, and training starts at the mean-image baseline instead of spending steps to learn it.
    self.mean_image = self.param('mean_image', nn.initializers.zeros, (self.image_size, self.image_size, 3))

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  def preprocess(self, images: jnp.ndarray) -> jnp.ndarray:
    """uint8 [B, H, W, 3] -> float32 [B, image_size, image_size, 3] in [-1, 1]: the reconstruction target."""
    return encoders.preprocess_images(images, self.image_size)

  def encode(self, images: jnp.ndarray) -> jnp.ndarray:
    """uint8 [B, H, W, 3] -> code logits float32 [B, gh, gw, codebook_size]."""
    return self.encoder(self.preprocess(images) - self.mean_image)

  def decode(self, one_hot: jnp.ndarray) -> jnp.ndarray:
    """(Soft) one-hot codes [B, gh, gw, codebook_size] -> images float32 [B, image_size, image_size, 3]."""
    return self.decoder(one_hot) + self.mean_image

  def decode_codes(self, codes: jnp.ndarray) -> jnp.ndarray:
    """int [B, gh, gw] -> images float32 [B, image_size, image_size, 3] in (about) [-1, 1]."""
    return self.decode(jax.nn.one_hot(codes, self.codebook_size))

  def codes(self, images: jnp.ndarray) -> jnp.ndarray:
    """uint8 [B, H, W, 3] -> int32 [B, gh, gw]: the most likely code of each patch (deterministic)."""
    return jnp.argmax(self.encode(images), axis=-1).astype(jnp.int32)

  def reconstruct(self, images: jnp.ndarray) -> jnp.ndarray:
    """uint8 [B, H, W, 3] -> float32 [B, image_size, image_size, 3]: decoded from the argmax codes."""
    return self.decode_codes(self.codes(images))

  def __call__(self, images: jnp.ndarray, *, rng: jax.Array, temperature: float):
    """Gumbel-softmax relaxed pass, for training.

    images: uint8 [B, H, W, 3]. Returns (reconstruction float32 [B, image_size, image_size, 3],
    logits float32 [B, gh, gw, codebook_size]).
    """
    logits = self.encode(images)
    soft_one_hot = gumbel_softmax(rng, logits, temperature)
    return self.decode(soft_one_hot), logits


def gumbel_softmax(rng: jax.Array, logits: jnp.ndarray, temperature) -> jnp.ndarray:
  """softmax((logits + Gumbel noise) / temperature) over the last axis: a relaxed one-hot sample."""
  gumbel = jax.random.gumbel(rng, logits.shape, logits.dtype)
  return jax.nn.softmax((logits + gumbel) / temperature, axis=-1)


def kl_to_uniform(logits: jnp.ndarray) -> jnp.ndarray:
  """KL(q || uniform) in nats for each position: logits [..., K] -> [...], in [0, log K]."""
  log_q = jax.nn.log_softmax(logits, axis=-1)
  return jnp.sum(jnp.exp(log_q) * log_q, axis=-1) + math.log(logits.shape[-1])


def perplexity(counts: jnp.ndarray) -> jnp.ndarray:
  """exp(entropy) of a histogram [K] (any scale): 1 when one code takes all, K when all are equally used."""
  p = counts / jnp.maximum(jnp.sum(counts), 1e-12)
  return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))
