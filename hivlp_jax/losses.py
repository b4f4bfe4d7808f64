"""Losses as pure functions of arrays.

Shapes: b = this device's batch, B = the global batch (all devices), D = embedding dim.
"""

from typing import Sequence

import jax
import jax.numpy as jnp

from hivlp_jax.models import matryoshka


def cross_entropy_rows(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
  """Softmax cross-entropy per row: logits [n, C], integer labels [n] -> [n]."""
  picked = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
  return jax.nn.logsumexp(logits, axis=1) - picked


def symmetric_info_nce(local_image: jnp.ndarray, local_text: jnp.ndarray, global_image: jnp.ndarray,
                       global_text: jnp.ndarray, temperature: jnp.ndarray, offset: jnp.ndarray | int = 0
                       ) -> tuple[jnp.ndarray, dict]:
  """(i2t + t2i) / 2 InfoNCE of this device's pairs against the whole global batch.

  Args:
    local_image, local_text: L2-normalised [b, D], this device's pairs (row i of each is a pair).
    global_image, global_text: L2-normalised [B, D], every device's pairs, this device's at rows
      offset .. offset + b - 1. On one device, pass the same arrays as local and global with offset 0.
    temperature: scalar; logits are similarities / temperature.
    offset: index in the global batch of this device's first pair.
  Returns:
    The mean over this device's pairs of (i2t + t2i) / 2, and a dict of diagnostics.
  """
  labels = offset + jnp.arange(local_image.shape[0])
  logits_i2t = local_image @ global_text.T / temperature  # [b, B]
  logits_t2i = local_text @ global_image.T / temperature  # [b, B]
  loss_i2t = cross_entropy_rows(logits_i2t, labels)
  loss_t2i = cross_entropy_rows(logits_t2i, labels)
  positive = jnp.sum(local_image * local_text, axis=-1)
  metrics = {
      'loss_i2t': jnp.mean(loss_i2t),
      'loss_t2i': jnp.mean(loss_t2i),
      'accuracy_i2t': jnp.mean(jnp.argmax(logits_i2t, axis=1) == labels),
      'accuracy_t2i': jnp.mean(jnp.argmax(logits_t2i, axis=1) == labels),
      'positive_similarity': jnp.mean(positive),
      'mean_similarity': jnp.mean(logits_i2t) * temperature,
  }
  return jnp.mean(loss_i2t + loss_t2i) / 2, metrics


def matryoshka_info_nce(local_image: jnp.ndarray, local_text: jnp.ndarray, global_image: jnp.ndarray,
                        global_text: jnp.ndarray, temperature: jnp.ndarray, nested_dims: Sequence[int],
                        dim_weights: Sequence[float], offset: jnp.ndarray | int = 0
                        ) -> tuple[jnp.ndarray, dict]:
  """Weighted sum over nested dims of `symmetric_info_nce` on the re-normalised prefixes.

  The embeddings are the unnormalised full projections: local [b, D], global [B, D].
  Returns the total loss and a dict with 'loss_dim{m}' (and accuracies) for every nested dim m.
  """
  total = 0.0
  metrics = {}
  for dim, weight in zip(nested_dims, dim_weights):
    prefix = lambda x: matryoshka.normalized_prefix(x, dim)
    loss, dim_metrics = symmetric_info_nce(prefix(local_image), prefix(local_text), prefix(global_image),
                                           prefix(global_text), temperature, offset)
    total = total + weight * loss
    metrics[f'loss_dim{dim}'] = loss
    for name in ('accuracy_i2t', 'accuracy_t2i'):
      metrics[f'{name}_dim{dim}'] = dim_metrics[name]
    if dim == nested_dims[-1]:
      metrics['positive_similarity'] = dim_metrics['positive_similarity']
      metrics['mean_similarity'] = dim_metrics['mean_similarity']
  return total, metrics
