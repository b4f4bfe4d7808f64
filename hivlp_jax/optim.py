"""One learning-rate schedule, weight-decay mask and optimizer for both trainers (two towers, visual tokenizer)."""

from typing import Any, Sequence

import jax
import optax

from hivlp_jax.models import encoders


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int, end_fraction: float) -> optax.Schedule:
  """Linear warm-up from 0 to `peak`, then cosine decay to `peak * end_fraction` at `total_steps`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=peak * end_fraction)


def decay_mask(params, excluded_names: Sequence[str] = ()) -> Any:
  """True for the leaves weight decay applies to: matrices (ndim > 1) not named in `excluded_names`.

  Biases, LayerNorm scales and other vectors are never decayed; embeddings-like matrices (position
  embeddings, [CLS], the masked-patch token, the mean image) are excluded by name. Under scanned encoder
  blocks (config.model.scan_layers) the leading [depth] axis does not count, so the mask is the unscanned one.
  """
  def decay(path, leaf):
    stacked = any(getattr(key, 'key', None) == encoders.SCANNED for key in path)
    return leaf.ndim - stacked > 1 and path[-1].key not in excluded_names
  return jax.tree_util.tree_map_with_path(decay, params)


def adamw(learning_rate_fn: optax.Schedule, *, b1: float, b2: float, weight_decay: float, grad_clip_norm: float,
          excluded_names: Sequence[str] = ()) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with decay on `decay_mask(params, excluded_names)`."""
  return optax.chain(
      optax.clip_by_global_norm(grad_clip_norm),
      optax.adamw(learning_rate_fn, b1=b1, b2=b2, weight_decay=weight_decay,
                  mask=lambda params: decay_mask(params, tuple(excluded_names))))
