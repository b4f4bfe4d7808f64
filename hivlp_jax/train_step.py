"""The one data-parallel train step of the two towers, composed from the loss terms of `settings.StepSettings`.

Terms: the contrastive loss at every nested dim (in-batch keys, or momentum keys and the negative queues
with distillation, KL alignment and the noisy-pair filter; or SigLIP's sigmoid loss over the ring of devices),
and the masked-token losses (MLM, MVM). The loss function adds them up in one place; `apply_update` applies
the gradient and guards against non-finite steps.
"""

import functools
from typing import Any, Optional

from absl import logging
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import optax

from hivlp_jax import losses
from hivlp_jax import momentum_towers
from hivlp_jax import optim
from hivlp_jax import queues
from hivlp_jax import settings as settings_lib
from hivlp_jax.models import pretrained
from hivlp_jax.models import two_towers
from hivlp_jax.replication import AXIS

# Matrices that are embeddings, not weights: never weight-decayed.
NO_DECAY = ('pos_embedding', 'cls', 'mask_token')


class TrainState(train_state.TrainState):
  # Consecutive skipped (non-finite) steps, a 0-d array so that it checkpoints and restores.
  nonfinite_steps: jnp.ndarray = None
  # With negative queues (config.contrastive.queue_size > 0), else None: the momentum towers' parameters,
  # the queues (whole [Q, D] on the host, a [Q / n, D] shard per device under pmap: see replication.py)
  # and the running statistics of the adaptive momentum filter.
  ema_params: Any = None
  negative_queues: Optional[queues.QueueState] = None
  filter_stats: Optional[momentum_towers.FilterStats] = None


def create_model(config: ml_collections.ConfigDict, vocab_size: int) -> two_towers.TwoTowers:
  return two_towers.TwoTowers(config.model, vocab_size=vocab_size, mlm=config.mvlm.mlm_weight > 0,
                              mvm_codebook_size=config.visual_tokenizer.codebook_size if config.mvlm.mvm_weight else 0,
                              sigmoid_loss=config.loss.kind == 'sigmoid')


def learning_rate_fn(config: ml_collections.ConfigDict) -> optax.Schedule:
  opt = config.optimizer
  return optim.warmup_cosine(opt.learning_rate, opt.warmup_steps, config.num_train_steps,
                             opt.end_learning_rate_fraction)


def init_params(config: ml_collections.ConfigDict, model: two_towers.TwoTowers, rng):
  """Freshly initialised parameters (no pretrained weights): pure, so `jax.eval_shape` can trace it."""
  size, max_len = config.model.image_size, config.model.text.max_len
  texts = jnp.ones((1, max_len), jnp.int32)
  num_patches = (size // config.model.image.patch_size)**2
  masked = dict(masked_texts=texts if model.mlm else None,
                patch_mask=jnp.zeros((1, num_patches), jnp.bool_) if model.mvm_codebook_size else None)
  return model.init(rng, jnp.zeros((1, size, size, 3), jnp.uint8), texts, **masked)['params']


def create_train_state(config: ml_collections.ConfigDict, model: two_towers.TwoTowers, rng) -> TrainState:
  """Initial state on the host, with the towers' pretrained weights where the config names them."""
  params = jax.jit(functools.partial(init_params, config, model))(rng)
  for tower, loader, checkpoint in (('image_tower', pretrained.load_vit_npz, config.model.image.init_checkpoint),
                                    ('text_tower', pretrained.load_bert_checkpoint, config.model.text.init_checkpoint)):
    if checkpoint:
      params = dict(params)
      params[tower], report = loader(checkpoint, params[tower])
      logging.info('%s initialised from %s: %s', tower, checkpoint, report)
  opt = config.optimizer
  tx = optim.adamw(learning_rate_fn(config), b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay,
                   grad_clip_norm=opt.grad_clip_norm, excluded_names=NO_DECAY)
  momentum_fields = {}
  if config.contrastive.queue_size:
    # The momentum towers start equal to the online ones.
    momentum_fields = dict(ema_params=params,
                           negative_queues=queues.init(config.contrastive.queue_size, config.model.embed_dim),
                           filter_stats=momentum_towers.init_filter_stats())
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                           nonfinite_steps=jnp.zeros((), jnp.int32), **momentum_fields)


def _gather(pair: losses.Pair) -> losses.Pair:
  return losses.Pair(*(jax.lax.all_gather(x, AXIS, tiled=True) for x in pair))


def momentum_keys(state: TrainState, batch: dict, options: settings_lib.QueueSettings):
  """The momentum towers on this device's pairs, and which pairs the noisy-pair filter keeps.

  Returns (keys of this device's pairs [b, D] x2, keep [b] bool or None, the new filter statistics or None,
  the filter's metrics).
  """
  image, text = jax.lax.stop_gradient(state.apply_fn({'params': state.ema_params}, batch['image'],
                                                     batch['text']))[:2]
  if not options.filter_noisy_pairs:
    return losses.Pair(image, text), None, None, {}
  keep, stats, dropped = momentum_towers.filter_pairs(
      momentum_towers.positive_similarity(image, text), state.filter_stats, k=options.filter_k,
      stats_momentum=options.filter_stats_momentum, axis_name=AXIS,
      active=state.step >= options.filter_warmup_steps)
  metrics = dict(filter_dropped_fraction=dropped, filter_mean=stats.mean, filter_std=jnp.sqrt(stats.var))
  if 'noisy' in batch:
    metrics.update(momentum_towers.flag_rates(keep, batch['noisy'], AXIS))
  return losses.Pair(image, text), keep, stats, metrics


def loss_fn(params, state: TrainState, batch: dict, settings: settings_lib.StepSettings, local_keys, keep,
            distill_weight):
  """The step's total loss and its metrics on this device; the one place where the terms are added up.

  batch: 'image' uint8 [b, H, W, 3], 'text' int32 [b, L]; with MLM 'masked_text' int32 [b, L] and
  'text_mask' bool [b, L]; with MVM 'patch_mask' bool [b, patches] and 'image_codes' int32 [b, patches].
  local_keys: the momentum keys of this device's pairs (None: in-batch negatives).
  """
  masked_modeling = settings.masked_modeling
  masked_inputs = {}
  if masked_modeling is not None and masked_modeling.mlm_weight:
    masked_inputs['masked_texts'] = batch['masked_text']
  if masked_modeling is not None and masked_modeling.mvm_weight:
    masked_inputs['patch_mask'] = batch['patch_mask']
  outputs = state.apply_fn({'params': params}, batch['image'], batch['text'], **masked_inputs)
  online = losses.Pair(outputs.image, outputs.text)
  if settings.loss_kind == 'sigmoid':  # In-batch only (settings.py refuses the queues): no all-gather.
    total, metrics = losses.sigmoid_loss(online, outputs.temperature, outputs.logit_bias, settings.nested_dims,
                                         settings.dim_weights, axis_name=AXIS)
  elif settings.queue is None:
    online_global = _gather(online)
    total, metrics = losses.contrastive_loss(online, online_global, online_global, outputs.temperature,
                                             settings.nested_dims, settings.dim_weights, axis_name=AXIS)
  else:
    online_global = _gather(online)
    total, metrics = losses.contrastive_loss(
        online, online_global, _gather(local_keys), outputs.temperature, settings.nested_dims,
        settings.dim_weights, axis_name=AXIS, queue=state.negative_queues, options=settings.queue, keep=keep,
        distill_weight=distill_weight)
  if outputs.mlm_logits is not None:
    metrics['loss_mlm'], metrics['accuracy_mlm'] = losses.masked_token_loss(
        outputs.mlm_logits, batch['text'], batch['text_mask'], AXIS)
    total = total + masked_modeling.mlm_weight * metrics['loss_mlm']
  if outputs.mvm_logits is not None:
    metrics['loss_mvm'], metrics['accuracy_mvm'] = losses.masked_token_loss(
        outputs.mvm_logits, batch['image_codes'], batch['patch_mask'], AXIS)
    total = total + masked_modeling.mvm_weight * metrics['loss_mvm']
  metrics['temperature'] = outputs.temperature
  return total, metrics


def _tree_finite(tree) -> jnp.ndarray:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def apply_gradients(state: TrainState, grads, settings: settings_lib.StepSettings) -> TrainState:
  """The optimizer update, then the learned log temperature clamped to its range (the parameter, not its exp)."""
  updated = state.apply_gradients(grads=grads)
  if settings.loss_kind == 'sigmoid':  # SigLIP's t' and bias are not clamped (two_towers.py).
    return updated
  low, high = settings.log_temperature_range
  return updated.replace(params=dict(updated.params,
                                     log_temperature=jnp.clip(updated.params['log_temperature'], low, high)))


def keep_if_finite(state: TrainState, updated: TrainState, loss, grad_norm) -> tuple[TrainState, jnp.ndarray]:
  """`updated`, or `state` unchanged where the loss, gradient, new parameters or optimizer state is non-finite.

  A skipped step still advances the step counter (so that it stays equal to the loop's: the checkpoint of
  step s always holds s steps) and counts in `nonfinite_steps`. Returns (state, finite).
  """
  finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _tree_finite(updated.params)
            & _tree_finite(updated.opt_state))
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
  return new_state.replace(step=state.step + 1,
                           nonfinite_steps=jnp.where(finite, 0, state.nonfinite_steps + 1)), finite


def train_step(state: TrainState, batch: dict, *, settings: settings_lib.StepSettings, learning_rate):
  """One data-parallel step; call under `jax.pmap(axis_name='batch')`. Returns (state, metrics).

  learning_rate: the schedule (for the metrics; the optimizer holds its own copy).
  """
  options = settings.queue
  local_keys = keep = distill_weight = filter_stats = None
  metrics = {}
  if options is not None:
    local_keys, keep, filter_stats, metrics = momentum_keys(state, batch, options)
    if options.distill_weight:
      ramp = jnp.minimum(1.0, state.step / max(options.distill_warmup_steps, 1))
      distill_weight = options.distill_weight * (ramp if options.distill_warmup_steps else 1.0)
      metrics['distill_weight'] = distill_weight
  (loss, loss_metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, state, batch, settings, local_keys, keep, distill_weight)
  (loss, loss_metrics), grads = jax.lax.pmean((loss, loss_metrics), AXIS), jax.lax.pmean(grads, AXIS)
  metrics = jax.lax.pmean(metrics, AXIS) | loss_metrics
  updated = apply_gradients(state, grads, settings)
  if options is not None:
    ema_momentum = momentum_towers.momentum_at(state.step, options.momentum, options.momentum_schedule,
                                               settings.num_train_steps)
    updated = updated.replace(
        ema_params=momentum_towers.ema_update(state.ema_params, updated.params, ema_momentum),
        negative_queues=queues.enqueue(state.negative_queues, *local_keys,
                                       jnp.ones(local_keys.image.shape[:1], jnp.bool_) if keep is None else keep,
                                       AXIS))
    if filter_stats is not None:
      updated = updated.replace(filter_stats=filter_stats)
    metrics['momentum'] = ema_momentum
  grad_norm = optax.tree.norm(grads)
  new_state, finite = keep_if_finite(state, updated, loss, grad_norm)
  metrics.update(
      loss=loss, grad_norm=grad_norm, param_norm=optax.tree.norm(state.params),
      update_norm=optax.tree.norm(jax.tree.map(jnp.subtract, updated.params, state.params)),
      learning_rate=learning_rate(state.step), nonfinite=1.0 - finite.astype(jnp.float32))
  return new_state, metrics


def make_pmapped_train_step(config: ml_collections.ConfigDict, devices=None):
  """The train step pmapped over `devices` (default: all local devices)."""
  step = functools.partial(train_step, settings=settings_lib.StepSettings.from_config(config),
                           learning_rate=learning_rate_fn(config))
  return jax.pmap(step, axis_name=AXIS, donate_argnums=(0,), devices=devices)
