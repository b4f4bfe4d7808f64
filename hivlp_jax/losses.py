"""Losses as pure functions of arrays.

Shapes: b = this device's batch, B = the global batch (all devices), D = embedding dim, S = queue slots
on this device.
"""

import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from hivlp_jax import queues
from hivlp_jax import settings
from hivlp_jax.models import matryoshka


class Pair(NamedTuple):
  """Image and text embeddings of the same pairs, row by row: [n, D] each."""
  image: jnp.ndarray
  text: jnp.ndarray


def task_kl(p_i2t: queues.Logits, p_t2i: queues.Logits, direction: str, stop_gradient: str,
            axis_name: str) -> jnp.ndarray:
  """[b]: the COTS task-level KL between image-to-text and text-to-image distributions of each pair.

  p_i2t, p_t2i: logits over supports that match column by column (pair i, then the queue slots).
  direction and stop_gradient: one of settings.KL_DIRECTIONS and settings.KL_STOP_GRADIENTS.
  """
  def kl(target, other):
    if stop_gradient == 'target':
      target = jax.lax.stop_gradient(target)
    return queues.kl_divergence(target, other, axis_name)
  if direction == 'i2t_t2i':
    return kl(p_i2t, p_t2i)
  if direction == 't2i_i2t':
    return kl(p_t2i, p_i2t)
  return (kl(p_i2t, p_t2i) + kl(p_t2i, p_i2t)) / 2


def contrastive_loss(online: Pair, online_global: Pair, keys: Pair, temperature: jnp.ndarray,
                     nested_dims: Sequence[int], dim_weights: Sequence[float], *, axis_name: Optional[str] = None,
                     queue: Optional[queues.QueueState] = None, options: Optional[settings.QueueSettings] = None,
                     keep: Optional[jnp.ndarray] = None, distill_weight: Optional[jnp.ndarray] = None,
                     image_ids: Optional[jnp.ndarray] = None) -> tuple[jnp.ndarray, dict]:
  """(i2t + t2i) / 2 InfoNCE of this device's pairs at every nested dim, weighted by `dim_weights`.

  Image i is contrasted with [the keys' texts, the text queue], text i with [the keys' images, the image
  queue]; the positive of row i is key offset + i (offset: this device's first row in the global batch).
  In-batch negatives are this loss with no queue and the online global batch as keys; momentum contrast
  (MoCo/ALBEF/COTS) passes the momentum towers' embeddings as keys and the queue shard. With a queue,
  `options` (settings.QueueSettings) adds:
  - distillation (ALBEF): the hard target is mixed with the keys' own softmax over the same support,
    (1 - alpha) * hard + alpha * soft, alpha = `distill_weight` (None: off);
  - task-level alignment (COTS): + kl_weight * KL between p_i2t of image i over [text i, text queue] and
    p_t2i of text i over [image i, image queue].
  With `image_ids` (ALBEF's retrieval fine-tuning), every column of the same image, in the batch or the
  queue, is a positive: the hard target is uniform over them (so no other caption of the image is scored as
  a negative), and the accuracy counts a row right when its best column is one of them.

  Args:
    online: [b, D] online embeddings of this device's pairs (unnormalised, full dim).
    online_global: [B, D] the same, all-gathered (device-major); the queue logits need every row.
    keys: [B, D] embeddings of the global batch to contrast against.
    temperature: scalar; logits are cosine similarities / temperature.
    axis_name: the pmap axis (None: one device, no queue).
    queue: this device's queue shard (S slots); needs `axis_name` and `options`.
    keep: [b] bool, pairs to train on (None: all); dropped pairs still serve as negatives.
    image_ids: [b] int32, the image id of this device's pairs (None: each pair is its own only positive);
      with a queue, the queue must hold its pairs' ids.
  Returns:
    This device's loss, scaled so that its mean over devices is the mean over every kept pair of the
    global batch, and a dict of diagnostics (also to be averaged over devices).
  """
  local_batch = online.image.shape[0]
  offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * local_batch
  labels = offset + jnp.arange(local_batch)
  if keep is None:
    row_mean = jnp.mean
  else:
    kept = keep.astype(jnp.float32)
    count = jnp.sum(kept) if axis_name is None else jax.lax.psum(jnp.sum(kept), axis_name)
    num_devices = 1 if axis_name is None else jax.lax.axis_size(axis_name)
    row_mean = lambda per_row: jnp.sum(kept * num_devices / jnp.maximum(count, 1.0) * per_row)

  same_image = None
  if image_ids is not None:
    ids_global = image_ids if axis_name is None else jax.lax.all_gather(image_ids, axis_name, tiled=True)  # [B]
    same_image = queues.Logits(batch=image_ids[:, None] == ids_global[None, :],  # [b, B]
                               queue=None if queue is None else  # [B, S]
                               (ids_global[:, None] == queue.image_ids[None, :]) & queue.filled[None, :])
  metrics, itc_total, kl_total = {}, 0.0, 0.0
  for dim, weight in zip(nested_dims, dim_weights):
    prefix = lambda x: matryoshka.normalized_prefix(x, dim)  # pylint: disable=cell-var-from-loop
    image, text = prefix(online.image), prefix(online.text)
    key_image, key_text = prefix(keys.image), prefix(keys.text)
    logits = {'i2t': queues.Logits(batch=image @ key_text.T / temperature, queue=None),  # [b, B]
              't2i': queues.Logits(batch=text @ key_image.T / temperature, queue=None)}
    if queue is not None:
      image_queue, text_queue = prefix(queue.image), prefix(queue.text)
      logits['i2t'] = logits['i2t']._replace(queue=queues.queue_logits(  # [B, S]
          prefix(online_global.image), text_queue, queue.filled, temperature))
      logits['t2i'] = logits['t2i']._replace(queue=queues.queue_logits(
          prefix(online_global.text), image_queue, queue.filled, temperature))
    positives, per_pair = {}, {}
    for name, (query_keys, support_keys) in {'i2t': (key_image, key_text), 't2i': (key_text, key_image)}.items():
      positives[name] = jnp.take_along_axis(logits[name].batch, labels[:, None], axis=1)[:, 0]
      if queue is None:
        logsumexp = jax.nn.logsumexp(logits[name].batch, axis=1)
        row_max = jnp.max(logits[name].batch, axis=1)
      else:
        logsumexp = queues.logsumexp(logits[name], axis_name)
        row_max = queues.row_max(logits[name], axis_name)
      if same_image is None:
        per_pair[name] = logsumexp - positives[name]
      else:  # The hard target spreads evenly over the image's columns: minus their mean logit.
        per_pair[name] = logsumexp - _mean_over(same_image, logits[name], axis_name)
        # The accuracy below then asks for the best column to be one of them.
        positives[name] = _max_over(same_image, logits[name], axis_name)
      if distill_weight is not None:
        # The keys' own distribution over the same support is the soft target.
        own_keys = jax.lax.dynamic_slice_in_dim(query_keys, offset, local_batch)
        queue_keys = text_queue if name == 'i2t' else image_queue
        soft_targets = jax.lax.stop_gradient(queues.Logits(
            batch=own_keys @ support_keys.T / temperature,
            queue=queues.queue_logits(query_keys, queue_keys, queue.filled, temperature)))
        soft = logsumexp - queues.expectation(soft_targets, logits[name], axis_name)
        per_pair[name] = (1.0 - distill_weight) * per_pair[name] + distill_weight * soft
      metrics[f'accuracy_{name}_dim{dim}'] = jnp.mean(positives[name] >= row_max)
      if same_image is not None:  # The KL below pairs each row with its own pair's column.
        positives[name] = jnp.take_along_axis(logits[name].batch, labels[:, None], axis=1)[:, 0]
    metrics[f'loss_dim{dim}'] = row_mean(per_pair['i2t'] + per_pair['t2i']) / 2
    itc_total = itc_total + weight * metrics[f'loss_dim{dim}']
    if options is not None and options.kl_weight:
      # Column k of both supports holds one pair: first pair i itself, then queue slot k.
      p_i2t = queues.Logits(batch=positives['i2t'][:, None], queue=logits['i2t'].queue)
      p_t2i = queues.Logits(batch=positives['t2i'][:, None], queue=logits['t2i'].queue)
      metrics[f'kl_dim{dim}'] = row_mean(task_kl(p_i2t, p_t2i, options.kl_direction, options.kl_stop_gradient,
                                                 axis_name))
      kl_total = kl_total + weight * metrics[f'kl_dim{dim}']
    if dim == nested_dims[-1]:
      metrics['positive_similarity'] = jnp.mean(jnp.sum(image * text, axis=-1))
      metrics['mean_similarity'] = jnp.mean(logits['i2t'].batch) * temperature
  metrics['loss_itc'] = itc_total
  if queue is None:
    return itc_total, metrics
  metrics['queue_filled_fraction'] = jnp.mean(queue.filled.astype(jnp.float32))
  if not options.kl_weight:
    return itc_total, metrics
  metrics['loss_kl'] = kl_total
  return itc_total + options.kl_weight * kl_total, metrics


def _masked(mask: queues.Logits, logits: queues.Logits, fill: float) -> queues.Logits:
  return jax.tree.map(lambda m, x: jnp.where(m, x, fill), mask, logits)


def _mean_over(mask: queues.Logits, logits: queues.Logits, axis_name: Optional[str]) -> jnp.ndarray:
  """[b]: each row's mean logit over the columns in `mask` (each row has at least one)."""
  if logits.queue is None:
    return jnp.sum(jnp.where(mask.batch, logits.batch, 0.0), axis=1) / jnp.sum(mask.batch, axis=1)
  # A uniform distribution over the masked columns is the softmax of 0 there and -1e9 elsewhere.
  uniform = _masked(mask, jax.tree.map(jnp.zeros_like, logits), queues.EMPTY_SLOT_LOGIT)
  return queues.expectation(uniform, logits, axis_name)


def _max_over(mask: queues.Logits, logits: queues.Logits, axis_name: Optional[str]) -> jnp.ndarray:
  """[b]: each row's largest logit over the columns in `mask` (no gradient)."""
  if logits.queue is None:
    return jax.lax.stop_gradient(jnp.max(jnp.where(mask.batch, logits.batch, -jnp.inf), axis=1))
  return queues.row_max(_masked(mask, logits, queues.EMPTY_SLOT_LOGIT), axis_name)


# SigLIP (Zhai et al. 2023): every (image, text) pair of the global batch is its own binary problem.


def _sigmoid_block(images: tuple[jnp.ndarray, ...], text: jnp.ndarray, temperature: jnp.ndarray, bias: jnp.ndarray,
                   *, dims: tuple[int, ...], positives: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
  """-sum log sigmoid(z * logits) over one [b, b'] block of pairs, at every nested dim.

  images: per nested dim, this device's image prefixes [b, dim] (normalised); text: [b', D] unnormalised.
  positives: the block is this device's own texts (z = +1 on its diagonal), else all negatives (z = -1).
  Returns [len(dims)] sums and [len(dims), b] each row's largest negative logit (for the accuracy).
  """
  sums, row_max = [], []
  for image, dim in zip(images, dims):
    logits = image @ matryoshka.normalized_prefix(text, dim).T / temperature + bias  # [b, b']
    signs = 2.0 * jnp.eye(*logits.shape) - 1.0 if positives else -1.0
    sums.append(-jnp.sum(jax.nn.log_sigmoid(signs * logits)))
    row_max.append(jnp.max(jnp.where(signs > 0, -jnp.inf, logits), axis=1))
  return jnp.stack(sums), jnp.stack(row_max)


def sigmoid_loss(online: Pair, temperature: jnp.ndarray, bias: jnp.ndarray, nested_dims: Sequence[int],
                 dim_weights: Sequence[float], *, axis_name: Optional[str] = None) -> tuple[jnp.ndarray, dict]:
  """SigLIP's loss -1/B sum_ij log sigmoid(z_ij (x_i . y_j / temperature + bias)) at every nested dim, weighted.

  z_ij = +1 for a pair (i = j), -1 otherwise; x, y are the re-normalised prefixes; SigLIP's t = exp(t') is
  1 / temperature. Under pmap each device keeps its images and passes the texts around the ring of devices
  (ppermute, the SigLIP paper's chunked scheme): n blocks of [b, b] logits one after the other, so no device
  holds [b, B] logits, let alone [B, B].

  Args:
    online: [b, D] x2, this device's pairs (unnormalised, full dim).
    temperature, bias: scalars, the learned ones.
    axis_name: the pmap axis (None: one device, b = B).
  Returns:
    This device's loss (its rows' sums / b, so that the mean over devices is the global loss) and a dict of
    diagnostics (also to be averaged over devices).
  """
  dims = tuple(nested_dims)
  images = tuple(matryoshka.normalized_prefix(online.image, dim) for dim in dims)
  # Remat: the backward pass recomputes a block's logits instead of keeping every block's [b, b] of them.
  own_block, other_block = (jax.checkpoint(functools.partial(_sigmoid_block, dims=dims, positives=positives))
                            for positives in (True, False))
  sums, row_max = own_block(images, online.text, temperature, bias)
  if axis_name is not None:
    num_devices = jax.lax.axis_size(axis_name)
    ring = [(k, (k + 1) % num_devices) for k in range(num_devices)]

    def visit(carry, _):  # One step: the previous device's texts arrive; all negatives for these images.
      texts, sums, row_max = carry
      texts = jax.lax.ppermute(texts, axis_name, ring)
      block_sums, block_max = other_block(images, texts, temperature, bias)
      return (texts, sums + block_sums, jnp.maximum(row_max, block_max)), None
    (_, sums, row_max), _ = jax.lax.scan(visit, (online.text, sums, row_max), None, length=num_devices - 1)
  per_dim = sums / online.image.shape[0]
  metrics = {}
  for k, dim in enumerate(dims):  # `positive` ends at the largest dim, as the softmax loss reports it.
    metrics[f'loss_dim{dim}'] = per_dim[k]
    positive = jnp.sum(images[k] * matryoshka.normalized_prefix(online.text, dim), axis=-1)  # [b] cosines.
    metrics[f'accuracy_i2t_dim{dim}'] = jnp.mean(positive / temperature + bias >= row_max[k])
  total = sum(weight * per_dim[k] for k, weight in enumerate(dim_weights))
  metrics.update(loss_itc=total, positive_similarity=jnp.mean(positive), logit_bias=bias)
  return total, metrics


# Masked vision-language modeling (COTS token level).


def masked_count(masked: jnp.ndarray, axis_name: str | None = None) -> jnp.ndarray:
  """The masked positions per device over the whole (global) batch, >= 1: the normaliser of `masked_token_loss`.

  masked: bool [b, N]. Under pmap, the psum over devices / their number, so that the devices' mean of each
  device's normalised sum is the global mean.
  """
  count = jnp.sum(masked.astype(jnp.float32))
  if axis_name is not None:
    count = jax.lax.psum(count, axis_name) / jax.lax.axis_size(axis_name)
  return jnp.maximum(count, 1.0)


def masked_token_loss(logits: jnp.ndarray, targets: jnp.ndarray, masked: jnp.ndarray,
                      axis_name: str | None = None, count: Optional[jnp.ndarray] = None
                      ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Cross-entropy and accuracy over the masked positions only (MLM: token ids; MVM: visual-token ids).

  Args:
    logits: [b, N, C]; targets: int [b, N]; masked: bool [b, N], the positions to predict.
    axis_name: under pmap, the device axis: the masked positions of the whole global batch count equally,
      however they fall on the devices (each device's value is scaled so that their mean is the global one).
    count: the normaliser, `masked_count` of a larger batch that these rows are a micro-batch of (gradient
      accumulation: the micro-batches' values then sum to the whole batch's); None: of these rows.
  Returns:
    (loss, accuracy), scalars; 0 when nothing is masked.
  """
  weights = masked.astype(jnp.float32)
  cross_entropy = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  if count is None:
    count = masked_count(masked, axis_name)
  return jnp.sum(weights * cross_entropy) / count, jnp.sum(weights * correct) / count
