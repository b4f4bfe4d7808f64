"""Losses as pure functions of arrays.

Shapes: b = this device's batch, B = the global batch (all devices), D = embedding dim, S = queue slots
on this device.
"""

from typing import Sequence

import jax
import jax.numpy as jnp

from hivlp_jax import queues
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


# Momentum contrast against queues (MoCo/ALBEF instance level, COTS task level). Under pmap only: the
# queues are sharded over the devices (queues.py), and the softmax over them is combined with collectives.

# KL(p_i2t || p_t2i), KL(p_t2i || p_i2t), or the mean of both.
KL_DIRECTIONS = ('i2t_t2i', 't2i_i2t', 'symmetric')
# 'target': no gradient through the first argument of each KL (the distribution the other is pulled to).
KL_STOP_GRADIENTS = ('none', 'target')


def task_kl(p_i2t: queues.Logits, p_t2i: queues.Logits, direction: str, stop_gradient: str,
            axis_name: str) -> jnp.ndarray:
  """[b]: the COTS task-level KL between image-to-text and text-to-image distributions of each pair.

  p_i2t, p_t2i: logits over supports that match column by column (pair i, then the queue slots).
  """
  def kl(target, other):
    if stop_gradient == 'target':
      target = jax.lax.stop_gradient(target)
    return queues.kl_divergence(target, other, axis_name)
  if direction == 'i2t_t2i':
    return kl(p_i2t, p_t2i)
  if direction == 't2i_i2t':
    return kl(p_t2i, p_i2t)
  if direction == 'symmetric':
    return (kl(p_i2t, p_t2i) + kl(p_t2i, p_i2t)) / 2
  raise ValueError(f'config.contrastive.kl_direction={direction!r} is not one of {KL_DIRECTIONS}.')


def momentum_info_nce(local_image: jnp.ndarray, local_text: jnp.ndarray, global_image: jnp.ndarray,
                      global_text: jnp.ndarray, momentum_image: jnp.ndarray, momentum_text: jnp.ndarray,
                      queue_shard: queues.QueueState, temperature: jnp.ndarray, nested_dims: Sequence[int],
                      dim_weights: Sequence[float], *, axis_name: str, keep: jnp.ndarray | None = None,
                      distill_weight: jnp.ndarray | float | None = None, kl_weight: float = 0.0,
                      kl_direction: str = 'symmetric', kl_stop_gradient: str = 'none'
                      ) -> tuple[jnp.ndarray, dict]:
  """Momentum contrastive loss against the queues at every nested dim; call under pmap.

  Image i is contrasted with [momentum texts of the global batch, text queue], text i with [momentum
  images of the global batch, image queue]; (i2t + t2i) / 2 per pair. Options:
  - distillation (ALBEF): the hard target is mixed with the momentum towers' softmax over the same
    support, (1 - alpha) * hard + alpha * soft, alpha = `distill_weight` (None: off);
  - task-level alignment (COTS): + kl_weight * KL between p_i2t of image i over [text i, text queue] and
    p_t2i of text i over [image i, image queue], in `kl_direction`.
  Each term is summed over nested dims with `dim_weights`.

  Args:
    local_image, local_text: [b, D] online embeddings of this device's pairs (unnormalised, full dim).
    global_image, global_text: [B, D] the same, all-gathered (device-major).
    momentum_image, momentum_text: [B, D] momentum embeddings of the global batch (get no gradient).
    queue_shard: this device's queue shard (S slots).
    temperature: scalar.
    keep: [b] bool, pairs to train on (None: all); dropped pairs still serve as negatives.
  Returns:
    This device's loss, scaled so that its mean over devices is the mean over every kept pair of the
    global batch, and a dict of diagnostics (also to be averaged over devices).
  """
  local_batch = local_image.shape[0]
  offset = jax.lax.axis_index(axis_name) * local_batch
  labels = offset + jnp.arange(local_batch)
  keep = jnp.ones((local_batch,), jnp.bool_) if keep is None else keep
  kept = keep.astype(jnp.float32)
  row_weights = kept * jax.lax.axis_size(axis_name) / jnp.maximum(jax.lax.psum(jnp.sum(kept), axis_name), 1.0)
  momentum_image, momentum_text = jax.lax.stop_gradient((momentum_image, momentum_text))
  own_rows = lambda x: jax.lax.dynamic_slice_in_dim(x, offset, local_batch)

  metrics, itc_total, kl_total = {}, 0.0, 0.0
  for dim, weight in zip(nested_dims, dim_weights):
    prefix = lambda x: matryoshka.normalized_prefix(x, dim)  # pylint: disable=cell-var-from-loop
    image, text = prefix(local_image), prefix(local_text)
    key_image, key_text = prefix(momentum_image), prefix(momentum_text)
    image_queue, text_queue = prefix(queue_shard.image), prefix(queue_shard.text)
    logits = {
        'i2t': queues.Logits(batch=image @ key_text.T / temperature,  # [b, B]
                             queue=queues.queue_logits(prefix(global_image), text_queue, queue_shard.filled,
                                                       temperature)),  # [B, S]
        't2i': queues.Logits(batch=text @ key_image.T / temperature,
                             queue=queues.queue_logits(prefix(global_text), image_queue, queue_shard.filled,
                                                       temperature)),
    }
    positives, itc = {}, 0.0
    for name, (query_keys, support_keys, queue) in {'i2t': (key_image, key_text, text_queue),
                                                    't2i': (key_text, key_image, image_queue)}.items():
      logsumexp = queues.logsumexp(logits[name], axis_name)
      positives[name] = jnp.take_along_axis(logits[name].batch, labels[:, None], axis=1)[:, 0]
      per_pair = logsumexp - positives[name]
      if distill_weight is not None:
        # The momentum towers' own distribution over the same support is the soft target.
        soft_targets = jax.lax.stop_gradient(queues.Logits(
            batch=own_rows(query_keys) @ support_keys.T / temperature,
            queue=queues.queue_logits(query_keys, queue, queue_shard.filled, temperature)))
        soft = logsumexp - queues.expectation(soft_targets, logits[name], axis_name)
        per_pair = (1.0 - distill_weight) * per_pair + distill_weight * soft
      itc = itc + per_pair / 2
      metrics[f'accuracy_{name}_dim{dim}'] = jnp.mean(positives[name] >= queues.row_max(logits[name], axis_name))
    metrics[f'loss_dim{dim}'] = jnp.sum(row_weights * itc)
    itc_total = itc_total + weight * metrics[f'loss_dim{dim}']
    if kl_weight:
      # Column k of both supports holds one pair: first pair i itself, then queue slot k.
      p_i2t = queues.Logits(batch=positives['i2t'][:, None], queue=logits['i2t'].queue)
      p_t2i = queues.Logits(batch=positives['t2i'][:, None], queue=logits['t2i'].queue)
      metrics[f'kl_dim{dim}'] = jnp.sum(row_weights * task_kl(p_i2t, p_t2i, kl_direction, kl_stop_gradient,
                                                               axis_name))
      kl_total = kl_total + weight * metrics[f'kl_dim{dim}']
    if dim == nested_dims[-1]:
      metrics['positive_similarity'] = jnp.mean(jnp.sum(image * text, axis=-1))
      metrics['mean_similarity'] = jnp.mean(logits['i2t'].batch) * temperature
  metrics['loss_itc'] = itc_total
  if kl_weight:
    metrics['loss_kl'] = kl_total
  metrics['queue_filled_fraction'] = jnp.mean(queue_shard.filled.astype(jnp.float32))
  return itc_total + kl_weight * kl_total, metrics


# Masked vision-language modeling (COTS token level).


def masked_token_loss(logits: jnp.ndarray, targets: jnp.ndarray, masked: jnp.ndarray,
                      axis_name: str | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Cross-entropy and accuracy over the masked positions only (MLM: token ids; MVM: visual-token ids).

  Args:
    logits: [b, N, C]; targets: int [b, N]; masked: bool [b, N], the positions to predict.
    axis_name: under pmap, the device axis: the masked positions of the whole global batch count equally,
      however they fall on the devices (each device's value is scaled so that their mean is the global one).
  Returns:
    (loss, accuracy), scalars; 0 when nothing is masked.
  """
  weights = masked.astype(jnp.float32)
  cross_entropy = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  count = jnp.sum(weights)
  if axis_name is not None:
    count = jax.lax.psum(count, axis_name) / jax.lax.axis_size(axis_name)
  count = jnp.maximum(count, 1.0)
  return jnp.sum(weights * cross_entropy) / count, jnp.sum(weights * correct) / count
