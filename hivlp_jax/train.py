"""Training loop: data-parallel (`jax.pmap`, axis 'batch') hierarchical two-tower pre-training."""

import dataclasses
import functools
import os
import time
from typing import Any, Iterator, Optional

from absl import logging
import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from hivlp_jax import config_lib
from hivlp_jax import evaluate
from hivlp_jax import losses
from hivlp_jax import masking
from hivlp_jax import momentum
from hivlp_jax import queues
from hivlp_jax.data import pipeline
from hivlp_jax.data import streaming
from hivlp_jax.data import webdataset
from hivlp_jax.models import pretrained
from hivlp_jax.models import two_towers

AXIS = 'batch'
DATA_STATE_DIR = 'data_state'  # In the workdir: the streamed data position of every checkpoint, per host.


class TrainState(train_state.TrainState):
  # Consecutive skipped (non-finite) steps, a 0-d array so that it checkpoints and restores.
  nonfinite_steps: jnp.ndarray = None
  # With momentum queues (config.contrastive.queue_size > 0), else None: the momentum towers' parameters,
  # the queues (whole [Q, D] on the host, a [Q / n, D] shard per device under pmap: see replicate_state)
  # and the running statistics of the adaptive momentum filter.
  ema_params: Any = None
  queues: Optional['queues.QueueState'] = None  # Quoted: the field shadows the module in the class body.
  filter_stats: Optional['momentum.FilterStats'] = None


def unreplicate(tree):
  """First replica of a pmapped pytree, as host numpy arrays.

  Host arrays, because orbax cannot save the host-local arrays of a multi-process pmap, and
  flax.jax_utils.unreplicate keeps a leading axis on one device.
  """
  return jax.tree.map(lambda x: np.asarray(x[0]), tree)


def replicate_state(state: TrainState, devices=None) -> TrainState:
  """Host state -> pmap layout on `devices`: replicated, except the queues, which are split into shards.

  The queues may be host arrays [Q, D] or global arrays (as `unreplicate_state` and a restore give them).
  """
  devices = devices or jax.local_devices()
  # Named like the pmap axis, the layout equals that of the step's outputs: one compile, not two.
  replicated = flax.jax_utils.replicate(state.replace(queues=None), devices, axis_name=AXIS)
  if state.queues is None:
    return replicated
  shards = queues.global_to_shards(state.queues, devices, queues.pmap_device_order(devices), AXIS)
  return replicated.replace(queues=shards)


def unreplicate_state(state: TrainState) -> TrainState:
  """Inverse of `replicate_state`: the first replica as host arrays, with the queues as global arrays.

  The queues stay sharded where they are (every process holds its devices' slots): orbax saves them so.
  """
  host = unreplicate(state.replace(queues=None))
  if state.queues is None:
    return host
  shards = sorted(state.queues.image.addressable_shards, key=lambda shard: shard.index[0].start)
  device_order = queues.pmap_device_order([shard.device for shard in shards])
  return host.replace(queues=queues.shards_to_global(state.queues, device_order))


def with_global_queues(state: TrainState) -> TrainState:
  """Host state whose queues become global arrays: the restore target orbax needs to read them sharded."""
  if state.queues is None:
    return state
  return state.replace(queues=queues.host_to_global(state.queues, queues.pmap_device_order(jax.local_devices())))


def create_model(config: ml_collections.ConfigDict, vocab_size: int) -> two_towers.TwoTowers:
  return two_towers.TwoTowers(config.model, vocab_size=vocab_size, mlm=config.mvlm.mlm_weight > 0,
                              mvm_codebook_size=config.visual_tokenizer.codebook_size if config.mvlm.mvm_weight else 0)


def create_learning_rate_fn(config: ml_collections.ConfigDict) -> optax.Schedule:
  opt = config.optimizer
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt.learning_rate, warmup_steps=opt.warmup_steps,
      decay_steps=max(config.num_train_steps, opt.warmup_steps + 1),
      end_value=opt.learning_rate * opt.end_learning_rate_fraction)


def weight_decay_mask(params) -> Any:
  """Decay matrices only: no biases, LayerNorm scales, position embeddings, [CLS] or temperature."""
  def decay(path, leaf):
    name = path[-1].key
    return leaf.ndim > 1 and name not in ('pos_embedding', 'cls')
  return jax.tree_util.tree_map_with_path(decay, params)


def create_optimizer(config: ml_collections.ConfigDict, learning_rate_fn) -> optax.GradientTransformation:
  opt = config.optimizer
  return optax.chain(
      optax.clip_by_global_norm(opt.grad_clip_norm),
      optax.adamw(learning_rate_fn, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay,
                  mask=weight_decay_mask))


def create_train_state(config: ml_collections.ConfigDict, model: two_towers.TwoTowers, rng) -> TrainState:
  size, max_len = config.model.image_size, config.model.text.max_len
  texts = jnp.ones((1, max_len), jnp.int32)
  num_patches = (size // config.model.image.patch_size)**2
  masked = dict(masked_texts=texts if model.mlm else None,
                patch_mask=jnp.zeros((1, num_patches), jnp.bool_) if model.mvm_codebook_size else None)
  params = jax.jit(model.init)(rng, jnp.zeros((1, size, size, 3), jnp.uint8), texts, **masked)['params']
  if config.model.image.init_checkpoint:
    params = dict(params)
    params['image_tower'], report = pretrained.load_vit_npz(config.model.image.init_checkpoint,
                                                             params['image_tower'])
    logging.info('Image tower initialised from %s: %s', config.model.image.init_checkpoint, report)
  if config.model.text.init_checkpoint:
    params = dict(params)
    params['text_tower'], report = pretrained.load_bert_checkpoint(config.model.text.init_checkpoint,
                                                                   params['text_tower'])
    logging.info('Text tower initialised from %s: %s', config.model.text.init_checkpoint, report)
  tx = create_optimizer(config, create_learning_rate_fn(config))
  momentum_fields = {}
  if config.contrastive.queue_size:
    # The momentum towers start equal to the online ones.
    momentum_fields = dict(ema_params=params,
                           queues=queues.init(config.contrastive.queue_size, config.model.embed_dim),
                           filter_stats=momentum.init_filter_stats())
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                           nonfinite_steps=jnp.zeros((), jnp.int32), **momentum_fields)


def online_forward(params, apply_fn, batch: dict, mvlm: Optional[ml_collections.FrozenConfigDict]):
  """The online towers on this device's batch, with the masked vision-language modeling terms.

  batch: 'image' uint8 [b, H, W, 3], 'text' int32 [b, L]; with MLM 'masked_text' int32 [b, L] and
  'text_mask' bool [b, L]; with MVM 'patch_mask' bool [b, patches] and 'image_codes' int32 [b, patches].
  Returns image and text embeddings [b, D], the model's extras, and the weighted MVLM loss with its metrics
  (0 and {} without MVLM).
  """
  masked_inputs = {}
  if mvlm is not None and mvlm.mlm_weight:
    masked_inputs['masked_texts'] = batch['masked_text']
  if mvlm is not None and mvlm.mvm_weight:
    masked_inputs['patch_mask'] = batch['patch_mask']
  image_embedding, text_embedding, extras = apply_fn({'params': params}, batch['image'], batch['text'],
                                                     **masked_inputs)
  loss, metrics = 0.0, {}
  if 'mlm_logits' in extras:
    metrics['loss_mlm'], metrics['accuracy_mlm'] = losses.masked_token_loss(
        extras['mlm_logits'], batch['text'], batch['text_mask'], AXIS)
    loss = loss + mvlm.mlm_weight * metrics['loss_mlm']
  if 'mvm_logits' in extras:
    metrics['loss_mvm'], metrics['accuracy_mvm'] = losses.masked_token_loss(
        extras['mvm_logits'], batch['image_codes'], batch['patch_mask'], AXIS)
    loss = loss + mvlm.mvm_weight * metrics['loss_mvm']
  return image_embedding, text_embedding, extras, loss, metrics


def loss_and_grads(params, apply_fn, batch: dict, *, nested_dims, dim_weights,
                   mvlm: Optional[ml_collections.FrozenConfigDict] = None):
  """Global-batch hierarchical contrastive loss (+ MVLM) and its gradient, averaged over the 'batch' axis.

  batch: 'image' uint8 [b, H, W, 3], 'text' int32 [b, L] (this device's part of the global batch), and
  the masked inputs of `online_forward` when `mvlm` asks for them.
  Returns ((loss, metrics), grads), identical on every device.
  """
  local_batch = batch['image'].shape[0]
  offset = jax.lax.axis_index(AXIS) * local_batch

  def loss_fn(params):
    image_embedding, text_embedding, extras, mvlm_loss, mvlm_metrics = online_forward(params, apply_fn, batch,
                                                                                       mvlm)
    # The positives of this device's rows sit at offset + i of the gathered global batch.
    global_image = jax.lax.all_gather(image_embedding, AXIS, tiled=True)
    global_text = jax.lax.all_gather(text_embedding, AXIS, tiled=True)
    loss, metrics = losses.matryoshka_info_nce(
        image_embedding, text_embedding, global_image, global_text, extras['temperature'],
        nested_dims, dim_weights, offset)
    metrics.update(mvlm_metrics, temperature=extras['temperature'])
    return loss + mvlm_loss, metrics

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return jax.lax.pmean((loss, metrics), AXIS), jax.lax.pmean(grads, AXIS)


def momentum_loss_and_grads(state: TrainState, batch: dict, *, nested_dims, dim_weights,
                            contrastive: ml_collections.FrozenConfigDict,
                            mvlm: Optional[ml_collections.FrozenConfigDict] = None):
  """Momentum contrastive loss against the queues (with the options of `contrastive`) and its gradient.

  batch: as for `loss_and_grads`. Returns ((loss, metrics), grads, updates): loss, metrics and grads
  averaged over the 'batch' axis, and the new `queues` and `filter_stats` of the state.
  """
  local_batch = batch['image'].shape[0]
  momentum_image, momentum_text, _ = jax.lax.stop_gradient(
      state.apply_fn({'params': state.ema_params}, batch['image'], batch['text']))  # [b, D] each
  keep = jnp.ones((local_batch,), jnp.bool_)
  updates, filter_metrics = {}, {}
  if contrastive.filter_noisy_pairs:
    keep, updates['filter_stats'], dropped = momentum.filter_pairs(
        momentum.positive_similarity(momentum_image, momentum_text), state.filter_stats, k=contrastive.filter_k,
        stats_momentum=contrastive.filter_stats_momentum, axis_name=AXIS)
    filter_metrics = dict(filter_dropped_fraction=dropped, filter_mean=updates['filter_stats'].mean,
                          filter_std=jnp.sqrt(updates['filter_stats'].var))
    if 'noisy' in batch:
      filter_metrics.update(momentum.flag_rates(keep, batch['noisy'], AXIS))
  distill_weight = None
  if contrastive.distill_weight:
    ramp = jnp.minimum(1.0, state.step / max(contrastive.distill_warmup_steps, 1))
    distill_weight = contrastive.distill_weight * (ramp if contrastive.distill_warmup_steps else 1.0)
  global_momentum_image = jax.lax.all_gather(momentum_image, AXIS, tiled=True)
  global_momentum_text = jax.lax.all_gather(momentum_text, AXIS, tiled=True)

  def loss_fn(params):
    image_embedding, text_embedding, extras, mvlm_loss, mvlm_metrics = online_forward(
        params, state.apply_fn, batch, mvlm)
    global_image = jax.lax.all_gather(image_embedding, AXIS, tiled=True)
    global_text = jax.lax.all_gather(text_embedding, AXIS, tiled=True)
    loss, metrics = losses.momentum_info_nce(
        image_embedding, text_embedding, global_image, global_text, global_momentum_image,
        global_momentum_text, state.queues, extras['temperature'], nested_dims, dim_weights, axis_name=AXIS,
        keep=keep if contrastive.filter_noisy_pairs else None, distill_weight=distill_weight,
        kl_weight=contrastive.kl_weight, kl_direction=contrastive.kl_direction,
        kl_stop_gradient=contrastive.kl_stop_gradient)
    metrics.update(mvlm_metrics, temperature=extras['temperature'])
    return loss + mvlm_loss, metrics

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics.update(filter_metrics)
  if distill_weight is not None:
    metrics['distill_weight'] = distill_weight
  updates['queues'] = queues.enqueue(state.queues, momentum_image, momentum_text, keep, AXIS)
  return jax.lax.pmean((loss, metrics), AXIS), jax.lax.pmean(grads, AXIS), updates


def train_step(state: TrainState, batch: dict, *, nested_dims, dim_weights, learning_rate_fn,
               contrastive: Optional[ml_collections.FrozenConfigDict] = None, num_train_steps: int = 0,
               mvlm: Optional[ml_collections.FrozenConfigDict] = None):
  """One data-parallel step; call under `jax.pmap(axis_name='batch')`.

  contrastive: config.contrastive when it has queues (queue_size > 0), else None (in-batch negatives only).
  mvlm: config.mvlm when a masked-modeling weight is set, else None.
  A step whose loss or gradient is not finite leaves the state unchanged except `nonfinite_steps`.
  """
  if contrastive is None:
    (loss, metrics), grads = loss_and_grads(state.params, state.apply_fn, batch, nested_dims=nested_dims,
                                            dim_weights=dim_weights, mvlm=mvlm)
  else:
    (loss, metrics), grads, updates = momentum_loss_and_grads(state, batch, nested_dims=nested_dims,
                                                              dim_weights=dim_weights, contrastive=contrastive,
                                                              mvlm=mvlm)
  updated = state.apply_gradients(grads=grads)
  if contrastive is not None:
    ema_momentum = momentum.momentum_at(state.step, contrastive.momentum, contrastive.momentum_schedule,
                                        num_train_steps)
    updated = updated.replace(ema_params=momentum.ema_update(state.ema_params, updated.params, ema_momentum),
                              **updates)
    metrics['momentum'] = ema_momentum
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
  new_state = new_state.replace(nonfinite_steps=jnp.where(finite, 0, state.nonfinite_steps + 1))

  metrics.update(
      loss=loss, grad_norm=grad_norm, param_norm=optax.tree.norm(state.params),
      update_norm=optax.tree.norm(jax.tree.map(jnp.subtract, updated.params, state.params)),
      learning_rate=learning_rate_fn(state.step), nonfinite=1.0 - finite.astype(jnp.float32))
  return new_state, metrics


def make_pmapped_train_step(config: ml_collections.ConfigDict, devices=None):
  """The train step pmapped over `devices` (default: all local devices)."""
  contrastive = None
  if config.contrastive.queue_size:
    contrastive = ml_collections.FrozenConfigDict(config.contrastive)
  mvlm = None
  if config.mvlm.mlm_weight or config.mvlm.mvm_weight:
    mvlm = ml_collections.FrozenConfigDict(config.mvlm)
  step = functools.partial(train_step, nested_dims=tuple(config.model.nested_dims),
                           dim_weights=tuple(config.loss.dim_weights),
                           learning_rate_fn=create_learning_rate_fn(config), contrastive=contrastive,
                           num_train_steps=config.num_train_steps, mvlm=mvlm)
  return jax.pmap(step, axis_name=AXIS, donate_argnums=(0,), devices=devices)


def masking_transform(config: ml_collections.ConfigDict, tokenizer) -> Optional[functools.partial]:
  """The host-side masking of config.mvlm for `pipeline.train_batches`, or None without MVLM."""
  settings = config.mvlm
  if not (settings.mlm_weight or settings.mvm_weight):
    return None
  grid = config.model.image_size // config.model.image.patch_size
  return functools.partial(
      masking.mask_batch, text_mask_ratio=settings.text_mask_ratio, image_mask_ratio=settings.image_mask_ratio,
      min_block_patches=settings.min_block_patches, grid=(grid, grid), mask_id=tokenizer.special_ids['[MASK]'],
      vocab_size=tokenizer.vocab_size, special_ids=tuple(tokenizer.special_ids.values()),
      mask_text_tokens=settings.mlm_weight > 0, mask_patches=settings.mvm_weight > 0)


def make_pmapped_embedders(model: two_towers.TwoTowers):
  embed_images = jax.pmap(lambda params, x: model.apply({'params': params}, x, method=model.embed_images))
  embed_texts = jax.pmap(lambda params, x: model.apply({'params': params}, x, method=model.embed_texts))
  return embed_images, embed_texts


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict, create: bool = True
                       ) -> ocp.CheckpointManager:
  """Async orbax checkpoints in WORKDIR/checkpoints (`create=False`: only read an existing folder)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=config.max_checkpoints_to_keep, create=create,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')), options=options)


def restore_latest(manager: ocp.CheckpointManager, state: TrainState) -> TrainState:
  """Restores the newest readable checkpoint; an unreadable one is reported and the next older tried."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=ocp.args.StandardRestore(state))
      logging.info('Resumed from the checkpoint of step %d in %s.', step, manager.directory)
      return restored
    except Exception as e:  # pylint: disable=broad-except
      logging.error('Checkpoint of step %d in %s could not be restored (%s: %s); trying an older one. '
                    'Delete that folder to silence this.', step, manager.directory, type(e).__name__, e)
  if manager.all_steps():
    raise RuntimeError(f'No checkpoint in {manager.directory} could be restored (steps '
                       f'{manager.all_steps()}); move the folder away to start afresh.')
  return state


def evaluate_model(config, model, params_replicated, data: pipeline.ImageTextSplit):
  """Embeds `data` and computes recall (and speed) with every retrieval mode of the config."""
  embed_images, embed_texts = make_pmapped_embedders(model)
  image_emb, text_emb, text_image_ids = evaluate.embed_split(
      functools.partial(embed_images, params_replicated), functools.partial(embed_texts, params_replicated),
      data, config.eval.batch_size)
  return evaluate.evaluate(image_emb, text_emb, text_image_ids, evaluate.modes_from_config(config),
                           config.eval.ks, config.eval.latency_queries)


def training_batches(config: ml_collections.ConfigDict, workdir: str, tokenizer, start_step: int
                     ) -> tuple[Iterator[dict], Optional[streaming.TrainStream]]:
  """The batches of steps start_step + 1, ... in pmap layout, and the stream when the data set is streamed.

  A streamed data set resumes from the data position saved with the checkpoint of `start_step`; the
  embedded one is indexed by step and needs no saved position.
  """
  transform = masking_transform(config, tokenizer)
  if pipeline.is_streamed(config):
    data_state = None
    if start_step:
      data_state = streaming.read_state(os.path.join(workdir, DATA_STATE_DIR), start_step)
      if data_state is None:
        logging.warning('No data position saved with the checkpoint of step %d: the training data restarts '
                        'from its beginning.', start_step)
    stream = streaming.create_train_stream(config, tokenizer, state=data_state, transform=transform)
    return stream, stream
  train_data = pipeline.load_split(config, 'train', tokenizer)
  logging.info('Training data: %d images, %d captions each; vocabulary of %d.', train_data.num_images,
               train_data.captions_per_image, tokenizer.vocab_size)
  if config.mvlm.mvm_weight:
    from hivlp_jax import visual_tokenizer  # pylint: disable=g-import-not-at-top  (it imports this module)
    train_data = dataclasses.replace(train_data, image_codes=visual_tokenizer.load_codes(config, 'train'))
  batches = pipeline.train_batches(train_data, config.batch_size, config.seed, start_step, transform=transform)
  return batches, None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_after_step: Optional[int] = None) -> Optional[dict]:
  """Trains (resuming from `workdir` when it holds a checkpoint), then evaluates. Returns the results.

  With `stop_after_step` (for time-limited jobs), training checkpoints at that step and returns None
  before evaluating; running again in the same workdir resumes from there.
  """
  # clu's writers import TensorFlow (seconds, 700 MiB): only the training loop needs them, not the step.
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  config_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  config_lib.check_workdir_config(workdir, config)
  is_chief = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)

  tokenizer = pipeline.get_tokenizer(config)
  model = create_model(config, tokenizer.vocab_size)
  state = with_global_queues(create_train_state(config, model, jax.random.key(config.seed)))
  manager = checkpoint_manager(workdir, config)
  state = restore_latest(manager, state)
  start_step = int(state.step)
  if start_step == 0:
    writer.write_hparams(config_lib.flatten(config))
  state = replicate_state(state)

  p_train_step = make_pmapped_train_step(config)
  batches, stream = training_batches(config, workdir, tokenizer, start_step)
  report_progress = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps, writer=writer,
                                                    every_steps=config.log_every_steps, every_secs=None)
  logging.info('Training from step %d to %d on %d devices (%d local).', start_step, config.num_train_steps,
               jax.device_count(), jax.local_device_count())
  pending_metrics = []
  window_start = time.perf_counter()
  end_step = config.num_train_steps if stop_after_step is None else min(stop_after_step, config.num_train_steps)
  for step in range(start_step + 1, end_step + 1):
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      state, metrics = p_train_step(state, next(batches))
    pending_metrics.append(metrics)
    report_progress(step)
    last = step == end_step
    if step % config.log_every_steps == 0 or last:
      summary = {k: float(np.mean([m[k][0] for m in pending_metrics])) for k in pending_metrics[0]}
      elapsed = time.perf_counter() - window_start
      summary['examples_per_sec'] = len(pending_metrics) * config.batch_size / elapsed
      summary['nonfinite_steps'] = summary.pop('nonfinite') * len(pending_metrics)
      if stream is not None:
        summary.update({f'data_skipped_{reason}': count for reason, count in stream.stats.as_dict().items()
                        if reason != 'samples'})
      writer.write_scalars(step, summary)
      pending_metrics, window_start = [], time.perf_counter()
      nonfinite_run = int(state.nonfinite_steps[0])
      if nonfinite_run >= config.max_consecutive_nonfinite_steps:
        manager.wait_until_finished()
        raise FloatingPointError(
            f'The loss or gradient was not finite for {nonfinite_run} steps in a row up to step {step}; '
            f'those steps were skipped. The last good checkpoint is in {manager.directory} (steps '
            f'{manager.all_steps()}). Lower config.optimizer.learning_rate or check the input data.')
    if step % config.checkpoint_every_steps == 0 or last:
      if stream is not None:  # First, so that every checkpoint has the data position that follows it.
        streaming.write_state(os.path.join(workdir, DATA_STATE_DIR), step, stream.get_state())
      manager.save(step, args=ocp.args.StandardSave(unreplicate_state(state)))
  manager.wait_until_finished()
  if stream is not None:
    stream.close()
    logging.info('Training data: %s.', webdataset.count_by_reason(stream.stats))
  if end_step < config.num_train_steps:
    logging.info('Stopped after step %d of %d as asked; run again to resume.', end_step, config.num_train_steps)
    return None

  logging.info('Evaluating on the %s split.', config.eval.split)
  eval_data = pipeline.load_split(config, config.eval.split, tokenizer)
  results = evaluate_model(config, model, state.params, eval_data)
  final_step = int(state.step[0])
  if is_chief:
    for name, metrics in results.items():
      writer.write_scalars(final_step, {f'eval/{name}/{k}': v for k, v in metrics.items()})
    evaluate.write_metrics_json(os.path.join(workdir, 'metrics.json'), results, final_step)
  writer.flush()
  logging.info('Results at step %d:\n%s', final_step, evaluate.format_table(results, config.eval.ks))
  return results
