"""The one data-parallel train step of the two towers, composed from the loss terms of `settings.StepSettings`.

Terms: the contrastive loss at every nested dim (in-batch keys, or momentum keys and the negative queues
with distillation, KL alignment and the noisy-pair filter; or SigLIP's sigmoid loss over the ring of devices),
and the masked-token losses (MLM, MVM). The loss function adds them up in one place; `apply_update` applies
the gradient and guards against non-finite steps.
"""

import functools
from typing import Any, NamedTuple, Optional

from absl import logging
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import optax

from hivlp_jax import errors
from hivlp_jax import init_from_run
from hivlp_jax import losses
from hivlp_jax import momentum_towers
from hivlp_jax import optim
from hivlp_jax import queues
from hivlp_jax import settings as settings_lib
from hivlp_jax.models import pretrained
from hivlp_jax.models import two_towers
from hivlp_jax.replication import AXIS

# Matrices that are embeddings, not weights: never weight-decayed.
NO_DECAY = ('pos_embedding', 'cell_pos_embedding', 'cls', 'mask_token')


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
  """The run's schedule; config.optimizer.warmup_fraction > 0 sets the warm-up as that share of the run."""
  opt = config.optimizer
  warmup = round(opt.warmup_fraction * config.num_train_steps) if opt.warmup_fraction else opt.warmup_steps
  return optim.warmup_cosine(opt.learning_rate, warmup, config.num_train_steps, opt.end_learning_rate_fraction)


def init_params(config: ml_collections.ConfigDict, model: two_towers.TwoTowers, rng):
  """Freshly initialised parameters (no pretrained weights): pure, so `jax.eval_shape` can trace it."""
  size, max_len = config.model.image_size, config.model.text.max_len
  texts = jnp.ones((1, max_len), jnp.int32)
  num_patches = (size // config.model.image.patch_size)**2
  masked = dict(masked_texts=texts if model.mlm else None,
                patch_mask=jnp.zeros((1, num_patches), jnp.bool_) if model.mvm_codebook_size else None)
  images = jnp.zeros((1, size, size, 3), jnp.uint8)
  if config.model.video.temporal == 'transformer':  # Only a clip creates the temporal Transformer's params.
    images = jnp.zeros((1, config.model.video.num_frames, size, size, 3), jnp.uint8)
  return model.init(rng, images, texts, **masked)['params']


def create_train_state(config: ml_collections.ConfigDict, model: two_towers.TwoTowers, rng,
                       from_init_run: bool = True) -> TrainState:
  """Initial state on the host, with the towers' pretrained weights where the config names them, then
  (with `from_init_run`) the parameters of config.init's run (`init_from_run`)."""
  params = jax.jit(functools.partial(init_params, config, model))(rng)
  for tower, loader, checkpoint in (('image_tower', pretrained.load_vit_npz, config.model.image.init_checkpoint),
                                    ('text_tower', pretrained.load_bert_checkpoint, config.model.text.init_checkpoint)):
    if checkpoint:
      params = dict(params)
      params[tower], report = loader(checkpoint, params[tower])
      logging.info('%s initialised from %s: %s', tower, checkpoint, report)
  ema_params = None
  if from_init_run and config.init.workdir:
    params, ema_params, _ = init_from_run.load(config, params)
  opt = config.optimizer
  tx = optim.adamw(learning_rate_fn(config), b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay,
                   grad_clip_norm=opt.grad_clip_norm, excluded_names=NO_DECAY)
  momentum_fields = {}
  if config.contrastive.queue_size:
    # The momentum towers start equal to the online ones.
    momentum_fields = dict(ema_params=params if ema_params is None else ema_params,
                           negative_queues=queues.init(config.contrastive.queue_size, config.model.embed_dim,
                                                       image_ids=config.contrastive.image_id_positives),
                           filter_stats=momentum_towers.init_filter_stats())
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                           nonfinite_steps=jnp.zeros((), jnp.int32), **momentum_fields)


def _gather(pair: losses.Pair) -> losses.Pair:
  return losses.Pair(*(jax.lax.all_gather(x, AXIS, tiled=True) for x in pair))


def momentum_embeddings(state: TrainState, images: jnp.ndarray, texts: jnp.ndarray) -> losses.Pair:
  """The momentum towers' embeddings of pairs [m, ...] -> [m, D] x2 (no gradient)."""
  outputs = state.apply_fn({'params': state.ema_params}, images, texts)
  return jax.lax.stop_gradient(losses.Pair(outputs.image, outputs.text))


def filter_keys(state: TrainState, keys: losses.Pair, batch: dict, options: settings_lib.QueueSettings):
  """Which of this device's pairs the noisy-pair filter keeps, judged by their momentum keys [b, D] x2.

  Returns (keep [b] bool or None, the new filter statistics or None, the filter's metrics).
  """
  if not options.filter_noisy_pairs:
    return None, None, {}
  keep, stats, dropped = momentum_towers.filter_pairs(
      momentum_towers.positive_similarity(*keys), state.filter_stats, k=options.filter_k,
      stats_momentum=options.filter_stats_momentum, axis_name=AXIS,
      active=state.step >= options.filter_warmup_steps)
  metrics = dict(filter_dropped_fraction=dropped, filter_mean=stats.mean, filter_std=jnp.sqrt(stats.var))
  if 'noisy' in batch:
    metrics.update(momentum_towers.flag_rates(keep, batch['noisy'], AXIS))
  return keep, stats, metrics


def masked_inputs(batch: dict, settings: settings_lib.StepSettings) -> dict:
  """The masked views the model takes for MLM / MVM (keyword arguments of `TwoTowers.__call__`)."""
  masked_modeling, inputs = settings.masked_modeling, {}
  if masked_modeling is not None and masked_modeling.mlm_weight:
    inputs['masked_texts'] = batch['masked_text']
  if masked_modeling is not None and masked_modeling.mvm_weight:
    inputs['patch_mask'] = batch['patch_mask']
  return inputs


def image_ids(batch: dict, settings: settings_lib.StepSettings) -> Optional[jnp.ndarray]:
  """[b] int32 image ids of this device's pairs with config.contrastive.image_id_positives, else None."""
  if not settings.image_id_positives:
    return None
  if 'image_id' not in batch:
    raise errors.InputError('config.contrastive.image_id_positives=True needs image ids in the batches, and this '
                            'data source gives none (web pairs have no ids): set it to False.')
  return batch['image_id']


def contrastive_terms(online: losses.Pair, temperature, logit_bias, state: TrainState,
                      settings: settings_lib.StepSettings, local_keys, keep, distill_weight, ids):
  """The contrastive loss of this device's online embeddings [b, D] x2 and its metrics (before pmean).

  ids: `image_ids` of the batch (None: each pair is its own only positive).
  """
  if settings.loss_kind == 'sigmoid':  # In-batch only (settings.py refuses the queues): no all-gather.
    total, metrics = losses.sigmoid_loss(online, temperature, logit_bias, settings.nested_dims,
                                         settings.dim_weights, axis_name=AXIS)
  elif settings.queue is None:
    online_global = _gather(online)
    total, metrics = losses.contrastive_loss(online, online_global, online_global, temperature,
                                             settings.nested_dims, settings.dim_weights, axis_name=AXIS,
                                             image_ids=ids)
  else:
    online_global = _gather(online)
    total, metrics = losses.contrastive_loss(
        online, online_global, _gather(local_keys), temperature, settings.nested_dims, settings.dim_weights,
        axis_name=AXIS, queue=state.negative_queues, options=settings.queue, keep=keep,
        distill_weight=distill_weight, image_ids=ids)
  metrics['temperature'] = temperature
  return total, metrics


def masked_terms(outputs: two_towers.TowerOutputs, batch: dict, settings: settings_lib.StepSettings,
                 counts: Optional[dict] = None):
  """The weighted MLM + MVM loss and their metrics; `counts` ('mlm', 'mvm'): normalisers of the whole batch
  when `batch` is one of its micro-batches (losses.masked_token_loss)."""
  total, metrics, counts = 0.0, {}, counts or {}
  for name, logits, targets, masked in (('mlm', outputs.mlm_logits, 'text', 'text_mask'),
                                        ('mvm', outputs.mvm_logits, 'image_codes', 'patch_mask')):
    if logits is None:
      continue
    metrics[f'loss_{name}'], metrics[f'accuracy_{name}'] = losses.masked_token_loss(
        logits, batch[targets], batch[masked], AXIS, count=counts.get(name))
    total = total + getattr(settings.masked_modeling, f'{name}_weight') * metrics[f'loss_{name}']
  return total, metrics


def loss_fn(params, state: TrainState, batch: dict, settings: settings_lib.StepSettings, local_keys, keep,
            distill_weight):
  """The step's total loss and its metrics on this device; the one place where the terms are added up.

  batch: 'image' uint8 [b, H, W, 3] (or clips [b, T, H, W, 3]), 'text' int32 [b, L]; with image-id positives 'image_id' int32 [b]; with MLM 'masked_text' int32 [b, L] and
  'text_mask' bool [b, L]; with MVM 'patch_mask' bool [b, patches] and 'image_codes' int32 [b, patches].
  local_keys: the momentum keys of this device's pairs (None: in-batch negatives).
  """
  outputs = state.apply_fn({'params': params}, batch['image'], batch['text'], **masked_inputs(batch, settings))
  total, metrics = contrastive_terms(losses.Pair(outputs.image, outputs.text), outputs.temperature,
                                     outputs.logit_bias, state, settings, local_keys, keep, distill_weight,
                                     image_ids(batch, settings))
  masked_total, masked_metrics = masked_terms(outputs, batch, settings)
  return total + masked_total, metrics | masked_metrics


def _micro_batches(batch: dict, steps: int) -> dict:
  """[b, ...] -> [steps, b / steps, ...]: micro-batch j holds rows j * b / steps onwards."""
  return jax.tree.map(lambda x: x.reshape((steps, -1) + x.shape[1:]), batch)


def embed_micro_batches(state: TrainState, micro: dict, with_keys: bool):
  """Pass 1 of accumulation: the online (and momentum) embeddings of every micro-batch, no activations kept.

  micro: the batch as [k, m, ...]. Returns (online [b, D] x2, momentum keys [b, D] x2 or None), rows in
  the batch's order.
  """
  def embed(pairs):
    outputs = state.apply_fn({'params': state.params}, pairs['image'], pairs['text'])
    keys = momentum_embeddings(state, pairs['image'], pairs['text']) if with_keys else None
    return losses.Pair(outputs.image, outputs.text), keys
  online, keys = jax.lax.map(embed, {'image': micro['image'], 'text': micro['text']})
  flat = lambda pair: None if pair is None else jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), pair)
  return flat(online), flat(keys)


def accumulated_loss_and_grads(state: TrainState, batch: dict, settings: settings_lib.StepSettings, online,
                               local_keys, keep, distill_weight):
  """`value_and_grad(loss_fn)` over micro-batches (GradCache), with every negative of the whole batch.

  The contrastive terms see the full [b, D] embeddings of pass 1 (`embed_micro_batches`): their gradient
  with respect to the embeddings (and the temperature / bias) is taken once. Pass 2 re-runs each
  micro-batch's forward pass and pulls its rows of that gradient back into the parameters (the vjp, as the
  gradient of <embedding gradient, embeddings>), adding the masked-token losses' own gradient; a scan over
  micro-batches keeps one micro-batch's activations at a time and a compiled step whose size does not grow
  with their number. Returns ((loss, metrics), grads) as `value_and_grad(loss_fn, has_aux=True)` does.
  """
  steps = settings.accumulation_steps
  def head_loss(online, params):  # The temperature / bias come from the parameters, as in loss_fn.
    outputs = state.apply_fn({'params': params}, None, None)
    return contrastive_terms(online, outputs.temperature, outputs.logit_bias, state, settings, local_keys, keep,
                             distill_weight, image_ids(batch, settings))
  (total, metrics), (online_grads, grads) = jax.value_and_grad(head_loss, argnums=(0, 1), has_aux=True)(
      online, state.params)
  counts = {name: losses.masked_count(batch[masked], AXIS)
            for name, masked in (('mlm', 'text_mask'), ('mvm', 'patch_mask')) if masked in batch}

  def micro_step(grads, inputs):
    micro, pulled = inputs
    def surrogate(params):
      outputs = state.apply_fn({'params': params}, micro['image'], micro['text'], **masked_inputs(micro, settings))
      pull = jnp.sum(pulled.image * outputs.image) + jnp.sum(pulled.text * outputs.text)
      masked_total, masked_metrics = masked_terms(outputs, micro, settings, counts)
      return pull + masked_total, (masked_total, masked_metrics)
    micro_grads, masked = jax.grad(surrogate, has_aux=True)(state.params)
    return jax.tree.map(jnp.add, grads, micro_grads), masked
  grads, (masked_totals, masked_metrics) = jax.lax.scan(
      micro_step, grads, (_micro_batches(batch, steps), _micro_batches(online_grads, steps)))
  metrics |= jax.tree.map(lambda x: jnp.sum(x, axis=0), masked_metrics)  # Each is normalised by the whole batch.
  return (total + jnp.sum(masked_totals), metrics), grads


def apply_gradients(state: TrainState, grads, settings: settings_lib.StepSettings) -> TrainState:
  """The optimizer update, then the learned log temperature clamped to its range (the parameter, not its exp)."""
  updated = state.apply_gradients(grads=grads)
  if settings.loss_kind == 'sigmoid':  # SigLIP's t' and bias are not clamped (two_towers.py).
    return updated
  low, high = settings.log_temperature_range
  return updated.replace(params=dict(updated.params,
                                     log_temperature=jnp.clip(updated.params['log_temperature'], low, high)))


def keep_if_finite(state: TrainState, updated: TrainState, loss, grad_norm,
                   update_norm) -> tuple[TrainState, jnp.ndarray]:
  """`updated`, or `state` unchanged where the loss, the gradient or the update is non-finite.

  update_norm: the norm of `updated.params - state.params`. The old parameters are finite (every kept state
  is), so a finite update norm means finite new parameters, whatever the learning rate did; and finite,
  norm-clipped gradients keep AdamW's moments finite. So three scalars guard the whole state, with no pass
  over the parameters or the optimizer state on the hot path.
  A skipped step still advances the step counter (so that it stays equal to the loop's: the checkpoint of
  step s always holds s steps) and counts in `nonfinite_steps`. Returns (state, finite).
  """
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
  return new_state.replace(step=state.step + 1,
                           nonfinite_steps=jnp.where(finite, 0, state.nonfinite_steps + 1)), finite


class Momentum(NamedTuple):
  """What a step with queues hands from the loss to the state update."""
  keys: losses.Pair  # This device's momentum keys [b, D] x2, to enqueue.
  keep: Optional[jnp.ndarray]  # [b] bool, the filter's verdict (None: no filter).
  filter_stats: Optional[momentum_towers.FilterStats]


def loss_and_grads(state: TrainState, batch: dict, settings: settings_lib.StepSettings):
  """The step's loss, metrics and gradient, averaged over devices; call under pmap.

  One shot, or over `settings.accumulation_steps` micro-batches (same values up to float32 round-off).
  Returns (loss, metrics, grads, Momentum or None without queues).
  """
  options = settings.queue
  local_keys = keep = distill_weight = filter_stats = online = None
  metrics = {}
  if settings.accumulation_steps > 1:
    online, local_keys = embed_micro_batches(state, _micro_batches(batch, settings.accumulation_steps),
                                             with_keys=options is not None)
  elif options is not None:
    local_keys = momentum_embeddings(state, batch['image'], batch['text'])
  if options is not None:
    keep, filter_stats, metrics = filter_keys(state, local_keys, batch, options)
    if options.distill_weight:
      ramp = jnp.minimum(1.0, state.step / max(options.distill_warmup_steps, 1))
      distill_weight = options.distill_weight * (ramp if options.distill_warmup_steps else 1.0)
      metrics['distill_weight'] = distill_weight
  if settings.accumulation_steps > 1:
    (loss, loss_metrics), grads = accumulated_loss_and_grads(state, batch, settings, online, local_keys, keep,
                                                             distill_weight)
  else:
    (loss, loss_metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state, batch, settings, local_keys, keep, distill_weight)
  (loss, loss_metrics), grads = jax.lax.pmean((loss, loss_metrics), AXIS), jax.lax.pmean(grads, AXIS)
  momentum = None if options is None else Momentum(local_keys, keep, filter_stats)
  return loss, jax.lax.pmean(metrics, AXIS) | loss_metrics, grads, momentum


def train_step(state: TrainState, batch: dict, *, settings: settings_lib.StepSettings, learning_rate):
  """One data-parallel step; call under `jax.pmap(axis_name='batch')`. Returns (state, metrics).

  learning_rate: the schedule (for the metrics; the optimizer holds its own copy).
  """
  options = settings.queue
  loss, metrics, grads, momentum = loss_and_grads(state, batch, settings)
  updated = apply_gradients(state, grads, settings)
  if options is not None:
    ema_momentum = momentum_towers.momentum_at(state.step, options.momentum, options.momentum_schedule,
                                               settings.num_train_steps)
    updated = updated.replace(
        ema_params=momentum_towers.ema_update(state.ema_params, updated.params, ema_momentum),
        negative_queues=queues.enqueue(
            state.negative_queues, *momentum.keys,
            jnp.ones(momentum.keys.image.shape[:1], jnp.bool_) if momentum.keep is None else momentum.keep, AXIS,
            image_ids(batch, settings)))
    if momentum.filter_stats is not None:
      updated = updated.replace(filter_stats=momentum.filter_stats)
    metrics['momentum'] = ema_momentum
  grad_norm = optax.tree.norm(grads)
  update_norm = optax.tree.norm(jax.tree.map(jnp.subtract, updated.params, state.params))
  new_state, finite = keep_if_finite(state, updated, loss, grad_norm, update_norm)
  metrics.update(
      loss=loss, grad_norm=grad_norm, param_norm=optax.tree.norm(state.params), update_norm=update_norm,
      learning_rate=learning_rate(state.step), nonfinite=1.0 - finite.astype(jnp.float32))
  return new_state, metrics


def make_pmapped_train_step(config: ml_collections.ConfigDict, devices=None):
  """The train step pmapped over `devices` (default: all local devices)."""
  step = functools.partial(train_step, settings=settings_lib.StepSettings.from_config(config),
                           learning_rate=learning_rate_fn(config))
  return jax.pmap(step, axis_name=AXIS, donate_argnums=(0,), devices=devices)
