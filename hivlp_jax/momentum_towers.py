"""Momentum towers (an EMA copy of the parameters) and the adaptive momentum filter of COTS.

The momentum towers are the model applied to `ema_params`, which follow the trained parameters as
ema = m * ema + (1 - m) * params after every optimizer step, start equal to them, and get no gradient.
Their embeddings fill the queues (queues.py) and serve as the keys of the momentum contrastive loss.

The adaptive momentum filter (AMF) scores each pair by the similarity of its image and text under the
momentum towers, keeps running (EMA) statistics of that score, and drops pairs scoring below
mean - k * std as probably noisy: they leave the losses and are not enqueued.
"""

import flax
import jax
import jax.numpy as jnp

from hivlp_jax.models import matryoshka

def momentum_at(step: jnp.ndarray, base: float, schedule: str, total_steps: int) -> jnp.ndarray:
  """EMA momentum at `step`: `base` throughout ('constant'), or raised from `base` to 1 on a cosine ('cosine',
  MoCo v3)."""
  if schedule == 'cosine':
    progress = jnp.clip(step / max(total_steps, 1), 0.0, 1.0)
    return 1.0 - (1.0 - base) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0
  return jnp.asarray(base, jnp.float32)


def ema_update(ema_params, params, momentum: jnp.ndarray):
  """ema = momentum * ema + (1 - momentum) * params, leaf by leaf; no gradient reaches `params`."""
  return jax.tree.map(lambda ema, online: momentum * ema + (1.0 - momentum) * jax.lax.stop_gradient(online),
                      ema_params, params)


@flax.struct.dataclass
class FilterStats:
  """Running statistics of the momentum positive similarity; 0-d arrays so that they checkpoint."""
  mean: jnp.ndarray  # float32
  var: jnp.ndarray  # float32
  updates: jnp.ndarray  # int32; 0 until the first batch, whose statistics then replace the initial ones.


def init_filter_stats() -> FilterStats:
  return FilterStats(mean=jnp.zeros((), jnp.float32), var=jnp.zeros((), jnp.float32),
                     updates=jnp.zeros((), jnp.int32))


def positive_similarity(image: jnp.ndarray, text: jnp.ndarray) -> jnp.ndarray:
  """Cosine similarity of each pair at the full dim: momentum embeddings [b, D] x2 -> [b]."""
  dim = image.shape[-1]
  return jnp.sum(matryoshka.normalized_prefix(image, dim) * matryoshka.normalized_prefix(text, dim), axis=-1)


def update_filter_stats(stats: FilterStats, batch_mean: jnp.ndarray, batch_var: jnp.ndarray,
                        stats_momentum: float) -> FilterStats:
  """EMA of the batch statistics; the first batch replaces the (meaningless) initial values."""
  first = stats.updates == 0
  blend = lambda running, batch: jnp.where(first, batch, stats_momentum * running + (1 - stats_momentum) * batch)
  return FilterStats(mean=blend(stats.mean, batch_mean), var=blend(stats.var, batch_var),
                     updates=stats.updates + 1)


def keep_mask(scores: jnp.ndarray, stats: FilterStats, k: float) -> jnp.ndarray:
  """[b] bool: True for pairs scoring at least mean - k * std."""
  return scores >= stats.mean - k * jnp.sqrt(stats.var)


def filter_pairs(scores: jnp.ndarray, stats: FilterStats, *, k: float, stats_momentum: float,
                 axis_name: str, active: jnp.ndarray | bool = True) -> tuple[jnp.ndarray, FilterStats, jnp.ndarray]:
  """Updates the running statistics with the global batch's scores, then thresholds; call under pmap.

  The threshold uses the statistics after this batch's update, so the first step thresholds against its
  own batch. Every pair updates the statistics, kept or not, so a run of noisy batches cannot drift them.
  While `active` is False (the warm-up, when the momentum towers are still near random) nothing is dropped,
  but the statistics still accumulate.

  Args:
    scores: [b] momentum positive similarities of this device's pairs.
  Returns:
    keep [b] bool, the new statistics (identical on every device), and the fraction of the global batch
    dropped.
  """
  batch_mean = jax.lax.pmean(jnp.mean(scores), axis_name)
  batch_var = jax.lax.pmean(jnp.mean(jnp.square(scores - batch_mean)), axis_name)
  stats = update_filter_stats(stats, batch_mean, batch_var, stats_momentum)
  keep = keep_mask(scores, stats, k) | jnp.logical_not(active)
  dropped = 1.0 - jax.lax.pmean(jnp.mean(keep.astype(jnp.float32)), axis_name)
  return keep, stats, dropped


def flag_rates(keep: jnp.ndarray, noisy: jnp.ndarray, axis_name: str) -> dict:
  """How well the filter finds known noisy pairs, over the global batch; call under pmap.

  keep, noisy: bool [b]. Returns 'filter_flagged_noisy' (fraction of the noisy pairs dropped) and
  'filter_dropped_clean' (fraction of the clean pairs dropped); 0 when the batch has none of a kind.
  """
  dropped = ~keep
  def fraction(selected):
    count = jax.lax.psum(jnp.sum(selected), axis_name)
    return jax.lax.psum(jnp.sum(dropped & selected), axis_name) / jnp.maximum(count, 1)
  return dict(filter_flagged_noisy=fraction(noisy), filter_dropped_clean=fraction(~noisy))
