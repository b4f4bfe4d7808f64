"""Matryoshka (nested) embeddings: one projection, read at several prefix lengths.

The embedding at nested dim m is the first m coordinates of the full projection, L2-normalised at that
length. One head serves every dim, so a gallery stored at the full dim serves coarse search by slicing.
"""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from hivlp_jax import errors


def validate_dims(nested_dims: Sequence[int], embed_dim: int) -> tuple[int, ...]:
  """Checks that the nested dims strictly increase and fit in the head; returns them as a tuple."""
  dims = tuple(int(d) for d in nested_dims)
  if not dims:
    raise errors.InputError('config.model.nested_dims is empty: give at least one embedding dim, e.g. (32, 256).')
  if any(d <= 0 for d in dims) or any(b <= a for a, b in zip(dims, dims[1:])):
    raise errors.InputError(f'config.model.nested_dims={dims} must be positive and strictly increasing.')
  if dims[-1] > embed_dim:
    raise errors.InputError(f'config.model.nested_dims={dims} has a dim larger than the head '
                            f'(config.model.embed_dim={embed_dim}).')
  return dims


def normalized_prefix(embeddings, dim: int, eps: float = 1e-6):
  """[..., D] -> [..., dim]: the first `dim` coordinates, L2-normalised.

  The one implementation for training (JAX arrays, traced) and serving (numpy arrays stay numpy, so a single
  query pays no JAX dispatch or device copy).
  """
  xp = np if isinstance(embeddings, np.ndarray) else jnp
  prefix = embeddings[..., :dim]
  return prefix / xp.sqrt(xp.sum(prefix * prefix, axis=-1, keepdims=True) + eps)


class NestedProjection(nn.Module):
  """Projects pooled features [B, W] to the largest nested dim [B, embed_dim], unnormalised."""
  embed_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, pooled: jnp.ndarray) -> jnp.ndarray:
    return nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype,
                    kernel_init=nn.initializers.xavier_uniform(), name='proj')(pooled)
