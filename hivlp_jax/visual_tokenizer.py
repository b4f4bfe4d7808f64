r"""The visual tokenizer stage: trains the discrete VAE, then serves its codes to masked vision modeling.

  python -m hivlp_jax.main --mode=tokenizer --config=configs/default.py --workdir=runs/tokenizer_default

trains on the training images of the config's data set (data-parallel, `jax.pmap` over axis 'batch'),
resumes from `<workdir>/checkpoints`, and ends by writing `<workdir>/metrics.json` (reconstruction MSE
against the mean-image baseline, code usage) and the codes of the training split, `<workdir>/codes-train.npy`.
Masked vision modeling then reads them with `load_codes(config)` (config.visual_tokenizer.workdir set to that
workdir), or from a user's own `.npy` (config.visual_tokenizer.codes_file).
"""

import functools
import json
import time
from typing import Optional

from absl import logging
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hivlp_jax import checkpointing
from hivlp_jax import config_lib
from hivlp_jax import errors
from hivlp_jax import files
from hivlp_jax import optim
from hivlp_jax import replication
from hivlp_jax import steps_in_flight
from hivlp_jax.data import embedded_scenes
from hivlp_jax.data import pipeline
from hivlp_jax.models import dvae
from hivlp_jax.models import encoders

AXIS = replication.AXIS
MODEL_FILE = 'tokenizer.json'  # The model's hyperparameters.
FIELDS_FILE = 'tokenizer_config.json'  # The config fields a resume must keep.
COMMAND = 'python -m hivlp_jax.main --mode=tokenizer --config=... --workdir=...'
# config.visual_tokenizer fields that may change when the stage resumes in the same workdir.
RESUMABLE_FIELDS = ('num_train_steps', 'log_every_steps', 'checkpoint_every_steps', 'workdir', 'codes_file')


def grid_size(config: ml_collections.ConfigDict) -> int:
  """Codes per side: one per ViT patch."""
  return config.model.image_size // config.model.image.patch_size


def model_kwargs(config: ml_collections.ConfigDict) -> dict:
  vt = config.visual_tokenizer
  return dict(image_size=config.model.image_size, patch_size=config.model.image.patch_size,
              codebook_size=vt.codebook_size, hidden_dim=vt.hidden_dim, code_dim=vt.code_dim,
              num_res_blocks=vt.num_res_blocks)


def create_model(config: ml_collections.ConfigDict) -> dvae.DiscreteVAE:
  return dvae.DiscreteVAE(**model_kwargs(config))


def temperature_at(step, start: float, end: float, num_steps: int):
  """Gumbel-softmax temperature, annealed exponentially from `start` (step 0) to `end` (num_steps, then held)."""
  progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(num_steps, 1), 0.0, 1.0)
  return start * (end / start)**progress


def create_learning_rate_fn(config: ml_collections.ConfigDict) -> optax.Schedule:
  vt = config.visual_tokenizer
  return optim.warmup_cosine(vt.learning_rate, vt.warmup_steps, vt.num_train_steps, end_fraction=0.05)


def create_train_state(config: ml_collections.ConfigDict, model: dvae.DiscreteVAE, rng,
                       mean_image: Optional[np.ndarray] = None) -> train_state.TrainState:
  """mean_image: float32 [image_size, image_size, 3], the training set's (see `mean_image`); None: zeros."""
  size = config.model.image_size
  params = jax.jit(functools.partial(model.init, temperature=1.0))(
      rng, jnp.zeros((1, size, size, 3), jnp.uint8), rng=rng)['params']
  if mean_image is not None:
    params = dict(params, mean_image=jnp.asarray(mean_image, jnp.float32))
  # Decay conv and codebook kernels only: no biases, and not the mean image.
  tx = optim.adamw(create_learning_rate_fn(config), b1=0.9, b2=0.99, weight_decay=config.visual_tokenizer.weight_decay,
                   grad_clip_norm=1.0, excluded_names=('mean_image',))
  return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def loss_fn(params, model: dvae.DiscreteVAE, images, rng, temperature, kl_weight: float):
  """Relaxed-code reconstruction MSE + kl_weight * KL(q(code | patch) || uniform), both per position means.

  images: uint8 [b, H, W, 3]. Returns (loss, (metrics, code histogram float32 [K] of this device's argmax
  codes)). MSE is in the model's [-1, 1] pixel space.
  """
  reconstruction, logits = model.apply({'params': params}, images, rng=rng, temperature=temperature)
  target = model.apply({'params': params}, images, method=model.preprocess)
  mse = jnp.mean(jnp.square(reconstruction - target))
  kl = jnp.mean(dvae.kl_to_uniform(logits))
  counts = jnp.sum(jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1]), axis=(0, 1, 2))
  return mse + kl_weight * kl, (dict(mse=mse, kl=kl), counts)


def train_step(state: train_state.TrainState, batch: dict, *, model: dvae.DiscreteVAE, seed: int, temperature_fn,
               kl_weight: float, learning_rate_fn):
  """One data-parallel step; call under `jax.pmap(axis_name='batch')`. batch['image']: uint8 [b, H, W, 3]."""
  # Gumbel noise: a pure function of (seed, step, device), so a resumed run draws what it would have drawn.
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), state.step), jax.lax.axis_index(AXIS))
  temperature = temperature_fn(state.step)
  (loss, (metrics, counts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, model, batch['image'], rng, temperature, kl_weight)
  grads = jax.lax.pmean(grads, AXIS)
  metrics = jax.lax.pmean(dict(metrics, loss=loss), AXIS)
  new_state = state.apply_gradients(grads=grads)
  metrics.update(
      temperature=temperature, learning_rate=learning_rate_fn(state.step), grad_norm=optax.tree.norm(grads),
      # Code usage of the global batch: 1 = collapsed on one code, codebook_size = all used equally.
      batch_perplexity=dvae.perplexity(jax.lax.psum(counts, AXIS)))
  return new_state, metrics


def make_pmapped_train_step(config: ml_collections.ConfigDict, model: dvae.DiscreteVAE, devices=None):
  vt = config.visual_tokenizer
  temperature_fn = functools.partial(temperature_at, start=vt.temperature_start, end=vt.temperature_end,
                                     num_steps=vt.num_train_steps)
  step = functools.partial(train_step, model=model, seed=config.seed, kl_weight=vt.kl_weight,
                           learning_rate_fn=create_learning_rate_fn(config), temperature_fn=temperature_fn)
  return jax.pmap(step, axis_name=AXIS, donate_argnums=(0,), devices=devices)


def make_pmapped_eval_step(model: dvae.DiscreteVAE):
  """(params, images uint8 [d, b, H, W, 3], mean_image float32 [d, S, S, 3]) -> per-device arrays of
  codes int32 [d, b, gh, gw], squared error of the argmax-code reconstruction and of the mean image [d, b]."""
  def step(params, images, mean_image):
    codes = model.apply({'params': params}, images, method=model.codes)
    reconstruction = model.apply({'params': params}, codes, method=model.decode_codes)
    target = model.apply({'params': params}, images, method=model.preprocess)
    return (codes, jnp.mean(jnp.square(reconstruction - target), axis=(1, 2, 3)),
            jnp.mean(jnp.square(mean_image - target), axis=(1, 2, 3)))
  return jax.pmap(step, axis_name=AXIS)


def _eval_batch_size(config: ml_collections.ConfigDict) -> int:
  """This host's evaluation batch: a multiple of its local devices."""
  per_device = max(1, config.visual_tokenizer.batch_size // jax.device_count())
  return per_device * jax.local_device_count()


def run_eval(model, params_replicated, images: np.ndarray, mean_image: np.ndarray, batch_size: int):
  """Codes and per-image errors of `images` uint8 [N, H, W, 3] on this host's devices.

  Returns (codes int32 [N, gh, gw], reconstruction squared error [N], mean-image squared error [N]).
  """
  eval_step = make_pmapped_eval_step(model)
  mean_replicated = np.broadcast_to(mean_image, (jax.local_device_count(),) + mean_image.shape)
  outputs = []
  for chunk, mask in pipeline.padded_batches(images, batch_size):
    result = eval_step(params_replicated, pipeline.shard({'image': chunk})['image'], mean_replicated)
    outputs.append([np.asarray(x).reshape((batch_size,) + x.shape[2:])[mask] for x in result])
  return tuple(np.concatenate(parts) for parts in zip(*outputs))


def code_usage(codes: np.ndarray, codebook_size: int) -> dict:
  """Perplexity (exp of the entropy of the code histogram) and the number of codes used, of int codes [...]."""
  counts = np.bincount(codes.ravel(), minlength=codebook_size)
  return dict(perplexity=float(dvae.perplexity(counts.astype(np.float64))), codes_used=int((counts > 0).sum()))


def _recorded_fields(config: ml_collections.ConfigDict) -> dict:
  """The fields a resumed run must keep: the data, the patch grid and the tokenizer's own fields."""
  flat = config_lib.flatten(config)
  keep = ('data.name', 'data.builder_config', 'model.image_size', 'model.image.patch_size', 'seed')
  return {k: v for k, v in flat.items()
          if k in keep or (k.startswith('visual_tokenizer.') and k.split('.', 1)[1] not in RESUMABLE_FIELDS)}


def _check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Records the model and its fields in `workdir`, or checks them against a previous run's record there."""
  checkpointing.check_recorded(files.path(workdir) / FIELDS_FILE, json.loads(json.dumps(_recorded_fields(config))),
                               lambda _: False, 'a visual tokenizer')
  if jax.process_index() == 0:
    files.write_json(files.path(workdir) / MODEL_FILE, dict(model=model_kwargs(config)))


def mean_image(images: np.ndarray, model: dvae.DiscreteVAE) -> np.ndarray:
  """The mean of uint8 images [N, H, W, 3] in the model's pixel space: float32 [image_size, image_size, 3]."""
  # Preprocessing is affine and resizing linear, so this is also the mean of the preprocessed images.
  average = images.astype(np.float64).mean(axis=0, keepdims=True).astype(np.float32)
  return np.asarray(encoders.preprocess_images(average, model.image_size))[0]


def train_tokenizer(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict:
  """Trains the dVAE on the training images (resuming from `workdir`), evaluates it and caches the codes.

  devices: the local devices that train (default: all); evaluation uses all. Returns the metrics written to
  `<workdir>/metrics.json`.
  """
  from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TensorFlow, as in train.py)
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  config_lib.validate_visual_tokenizer(config)
  vt = config.visual_tokenizer
  files.make_dir(workdir)
  _check_workdir(workdir, config)
  is_chief = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)

  tokenizer = pipeline.get_tokenizer(config)
  train_data = pipeline.load_split(config, 'train', tokenizer)
  model = create_model(config)
  average = mean_image(train_data.images, model)
  state = create_train_state(config, model, jax.random.key(config.seed), average)
  logging.info('Visual tokenizer: %d parameters, a %dx%d code grid of %d codes; %d training images.',
               sum(x.size for x in jax.tree.leaves(state.params)), grid_size(config), grid_size(config),
               vt.codebook_size, train_data.num_images)
  checkpoints = checkpointing.Checkpoints(workdir, config.max_checkpoints_to_keep)
  state = checkpoints.restore_latest(state)
  start_step = int(state.step)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in config_lib.flatten(config).items()
                          if k.startswith(('visual_tokenizer.', 'data.', 'model.image'))})
  devices = devices or jax.local_devices()
  state = replication.replicate(state, devices)

  p_train_step = make_pmapped_train_step(config, model, devices)
  batches = pipeline.train_batches(train_data, vt.batch_size, config.seed, start_step)
  report_progress = periodic_actions.ReportProgress(num_train_steps=vt.num_train_steps, writer=writer,
                                                    every_steps=vt.log_every_steps, every_secs=None)
  logging.info('Training the visual tokenizer from step %d to %d on %d devices.', start_step,
               vt.num_train_steps, jax.device_count())
  pending_metrics, window_start = [], time.perf_counter()
  in_flight = steps_in_flight.StepsInFlight()
  for step in range(start_step + 1, vt.num_train_steps + 1):
    with jax.profiler.StepTraceAnnotation('tokenizer', step_num=step):
      images = next(batches)['image']  # [local devices, b, H, W, 3] -> [len(devices), ...]
      in_flight.wait()
      state, metrics = p_train_step(state, {'image': images.reshape((len(devices), -1) + images.shape[2:])})
    in_flight.add(metrics)
    pending_metrics.append(metrics)
    report_progress(step)
    last = step == vt.num_train_steps
    if step % vt.log_every_steps == 0 or last:
      summary = {k: float(np.mean([m[k][0] for m in pending_metrics])) for k in pending_metrics[0]}
      summary['examples_per_sec'] = len(pending_metrics) * vt.batch_size / (time.perf_counter() - window_start)
      writer.write_scalars(step, summary)
      if not np.isfinite(summary['loss']):
        raise errors.NonFiniteError(f'The visual tokenizer loss is {summary["loss"]} at step {step}; lower '
                                 'config.visual_tokenizer.learning_rate.')
      pending_metrics, window_start = [], time.perf_counter()
      checkpoints.record_finished()
    if step % vt.checkpoint_every_steps == 0 or last:
      checkpoints.save(step, replication.unreplicate(state))
  checkpoints.close()

  logging.info('Evaluating the visual tokenizer on the %s split; caching the codes of the training split.',
               vt.eval_split)
  eval_images = pipeline.load_split(config, vt.eval_split, tokenizer).images
  batch_size = _eval_batch_size(config)
  params = replication.replicate(replication.unreplicate(state.params))
  codes, reconstruction_se, baseline_se = run_eval(model, params, eval_images, average, batch_size)
  train_codes, _, _ = run_eval(model, params, train_data.images, average, batch_size)
  final_step = int(state.step[0])
  results = dict(step=final_step, split=vt.eval_split, num_images=int(eval_images.shape[0]),
                 reconstruction_mse=float(reconstruction_se.mean()), mean_image_mse=float(baseline_se.mean()),
                 **code_usage(codes, vt.codebook_size), codebook_size=vt.codebook_size,
                 grid=[grid_size(config)] * 2,
                 train=code_usage(train_codes, vt.codebook_size))
  if is_chief:
    writer.write_scalars(final_step, {f'eval/{k}': results[k] for k in
                                      ('reconstruction_mse', 'mean_image_mse', 'perplexity', 'codes_used')})
    files.write_json(files.path(workdir) / 'metrics.json', results)
    files.save_npy(files.path(workdir) / 'codes-train.npy', train_codes.astype(np.int32))
  writer.flush()
  logging.info('Visual tokenizer at step %d: %s', final_step, json.dumps(results))
  return results


def _split_num_images(config: ml_collections.ConfigDict, split: str) -> int:
  if config.data.name != 'embedded_scenes':
    return pipeline.load_split(config, split, pipeline.get_tokenizer(config)).num_images
  builder = embedded_scenes.EmbeddedScenes(data_dir=config.data.data_dir, config=config.data.builder_config)
  builder.download_and_prepare()
  return builder.info.splits[split].num_examples


def check_codes(codes: np.ndarray, config: ml_collections.ConfigDict, num_images: int, source: str) -> np.ndarray:
  """Checks codes [num_images, grid, grid] against the config; returns them as int32. `source` names them."""
  grid = grid_size(config)
  vt = config.visual_tokenizer
  if codes.ndim != 3 or codes.shape[1:] != (grid, grid):
    raise errors.InputError(f'{source} holds codes of shape {codes.shape}, but config.model.image_size='
                            f'{config.model.image_size} / config.model.image.patch_size='
                            f'{config.model.image.patch_size} '
                            f'needs a grid of {grid}x{grid}: [num_images, {grid}, {grid}].')
  if codes.shape[0] != num_images:
    raise errors.InputError(f'{source} holds codes for {codes.shape[0]} images, but the split has {num_images} '
                            f'(config.data.name={config.data.name!r}, builder_config={config.data.builder_config!r}).')
  if not np.issubdtype(codes.dtype, np.integer):
    raise errors.InputError(f'{source} holds {codes.dtype} codes; they must be integers.')
  if codes.size and (codes.min() < 0 or codes.max() >= vt.codebook_size):
    raise errors.InputError(f'{source} holds codes in [{codes.min()}, {codes.max()}], outside [0, '
                            f'config.visual_tokenizer.codebook_size={vt.codebook_size}).')
  return codes.astype(np.int32)


def restore_model(workdir: str, config: ml_collections.ConfigDict):
  """The frozen tokenizer of a stage workdir: (model, params) from its record and newest checkpoint."""
  del config  # The record holds the model's hyperparameters.
  model = dvae.DiscreteVAE(**files.read_json(files.path(workdir) / MODEL_FILE)['model'])
  size = model.image_size
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.uint8),
                                               temperature=1.0, rng=jax.random.key(0))['params'])
  try:
    params, _ = checkpointing.restore_params(workdir, abstract)
  except FileNotFoundError:
    raise errors.MissingInputError(f'No checkpoint in {workdir}: train the tokenizer first ({COMMAND}).') from None
  return model, params


def load_codes(config: ml_collections.ConfigDict, split: str = 'train', num_images: Optional[int] = None
               ) -> np.ndarray:
  """The visual-token ids of the images of `split`, in the split's order: int32 [N, grid, grid].

  From config.visual_tokenizer.codes_file when set (its '{split}' is replaced by the split; without one the
  file serves the training split only), else from the tokenizer stage's cache in
  config.visual_tokenizer.workdir, computed with the restored checkpoint (and cached) when missing.
  num_images: the split's size when the caller has it (else read from the data set).
  """
  vt = config.visual_tokenizer
  if num_images is None:
    num_images = _split_num_images(config, split)
  if vt.codes_file:
    if '{split}' not in vt.codes_file and split != 'train':
      raise errors.InputError(f'config.visual_tokenizer.codes_file={vt.codes_file!r} holds the codes of the training '
                              f'split; for the {split!r} split put "{{split}}" in its name.')
    path = vt.codes_file.replace('{split}', split)
    if not files.path(path).exists():
      raise errors.MissingInputError(f'config.visual_tokenizer.codes_file={vt.codes_file!r}: {path} does not exist.')
    return check_codes(files.load_npy(path), config, num_images, f'config.visual_tokenizer.codes_file {path}')
  if not vt.workdir:
    raise errors.InputError('No visual tokens: set config.visual_tokenizer.workdir to a tokenizer stage workdir '
                            f'(train one with {COMMAND}), or config.visual_tokenizer.codes_file to a .npy of codes.')
  path = files.path(vt.workdir) / f'codes-{split}.npy'
  source = f'config.visual_tokenizer.workdir={vt.workdir!r} ({path.name})'
  if path.exists():
    return check_codes(files.load_npy(path), config, num_images, source)
  if not (files.path(vt.workdir) / MODEL_FILE).exists():
    raise errors.MissingInputError(f'config.visual_tokenizer.workdir={vt.workdir!r} holds no trained visual tokenizer; '
                                   f'train one there with {COMMAND}.')
  model, params = restore_model(vt.workdir, config)
  if (model.image_size, model.patch_size) != (config.model.image_size, config.model.image.patch_size):
    raise errors.InputError(f'{source}: its tokenizer was trained for image_size={model.image_size}, patch_size='
                            f'{model.patch_size}, but config.model has image_size={config.model.image_size}, '
                            f'image.patch_size={config.model.image.patch_size}.')
  logging.info('Computing the visual tokens of the %s split with the tokenizer in %s.', split, vt.workdir)
  images = pipeline.load_split(config, split, pipeline.get_tokenizer(config)).images
  params_replicated = replication.replicate(params)
  codes, _, _ = run_eval(model, params_replicated, images, np.zeros((model.image_size,) * 2 + (3,), np.float32),
                         _eval_batch_size(config))
  codes = check_codes(codes, config, num_images, source)  # int32
  if jax.process_index() == 0:
    files.save_npy(path, codes)
  return codes
