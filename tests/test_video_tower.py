"""The video tower: the image tower over a clip's frames, a temporal aggregator, the image head (issue 16)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hivlp_jax import config_lib
from hivlp_jax import errors
from hivlp_jax import train_step
from hivlp_jax.models import encoders
from hivlp_jax.models import matryoshka
from hivlp_jax.models import video
from tests.conftest import tiny_config
from tests.test_momentum_training import _train
from tests.test_train import _random_batch

NUM_FRAMES = 3


def _video_config(temporal='mean'):
  config = tiny_config('unused')  # No data is read.
  config.model.nested_dims, config.loss.dim_weights = (8, 64), (1.0, 1.0)
  config.model.video.update(dict(temporal=temporal, depth=1, num_frames=NUM_FRAMES))
  config.batch_size = 16
  config.optimizer.warmup_steps = 1
  return config


def _model_and_params(config, seed=0):
  model = train_step.create_model(config, vocab_size=50)
  return model, train_step.init_params(config, model, jax.random.key(seed))


def _clips(batch, num_frames, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (batch, num_frames, 32, 32, 3), dtype=np.uint8)


def _embed(model, params, images):
  return np.asarray(model.apply({'params': params}, images, method=model.embed_images))


def test_mean_of_one_frame_is_the_image_embedding():
  model, params = _model_and_params(_video_config('mean'))
  clips = _clips(4, 1)
  np.testing.assert_allclose(_embed(model, params, clips), _embed(model, params, clips[:, 0]), rtol=1e-6, atol=1e-6)
  # Through __call__ too, with 48 px frames resized as images are.
  frames = np.random.default_rng(1).integers(0, 256, (4, 1, 48, 48, 3), dtype=np.uint8)
  outputs = model.apply({'params': params}, frames, None)
  np.testing.assert_allclose(outputs.image, _embed(model, params, frames[:, 0]), rtol=1e-6, atol=1e-6)


def test_mean_ignores_frame_order_and_the_transformer_does_not():
  clips = _clips(4, NUM_FRAMES)
  reversed_clips = clips[:, ::-1]
  model, params = _model_and_params(_video_config('mean'))
  np.testing.assert_allclose(_embed(model, params, clips), _embed(model, params, reversed_clips), rtol=1e-5,
                             atol=1e-5)
  model, params = _model_and_params(_video_config('transformer'))
  forward, backward = _embed(model, params, clips), _embed(model, params, reversed_clips)
  # Only the learned frame positions (normal(0.02) at init) tell the orders apart: a small but clear gap.
  assert np.abs(forward - backward).max() > 1e-3 * np.abs(forward).max()


def test_patch_cells_pool_the_patch_grid_and_the_transformer_reads_them():
  tokens = np.random.default_rng(0).normal(size=(2, 16, 5)).astype(np.float32)  # A 4 x 4 patch grid.
  grid = tokens.reshape(2, 4, 4, 5)
  expected = np.stack([grid[:, r:r + 2, c:c + 2].mean(axis=(1, 2)) for r in (0, 2) for c in (0, 2)], axis=1)
  np.testing.assert_allclose(video.patch_cells(tokens, 2), expected, rtol=1e-6, atol=1e-6)
  config = _video_config('transformer')
  config.model.video.patch_grid = 2
  model, params = _model_and_params(config)
  assert params['temporal']['cell_pos_embedding'].shape == (1, 1, 4, config.model.image.width)
  clips = _clips(4, NUM_FRAMES)
  forward, backward = _embed(model, params, clips), _embed(model, params, clips[:, ::-1])
  assert np.abs(forward - backward).max() > 1e-3 * np.abs(forward).max()
  # With the frames' [CLS] fixed, other cells give another clip feature: the Transformer reads them.
  temporal = video.TemporalTransformer(NUM_FRAMES, 1, 4, 32, cells_per_frame=4)
  rng = np.random.default_rng(1)
  frames = rng.normal(size=(2, NUM_FRAMES, 16)).astype(np.float32)  # [B, T, W]
  cells = rng.normal(size=(2, 2, NUM_FRAMES, 4, 16)).astype(np.float32)  # Two draws of [B, T, cells, W].
  variables = temporal.init(jax.random.key(0), frames, cells[0])
  one, other = (temporal.apply(variables, frames, c) for c in cells)
  assert np.abs(one - other).max() > 1e-2


def test_frame_differences_go_through_the_image_tower_to_the_transformer():
  clips = _clips(2, NUM_FRAMES).astype(np.float32)
  np.testing.assert_array_equal(video.with_differences(clips)[:, NUM_FRAMES:], clips[:, 1:] - clips[:, :-1])
  config = _video_config('transformer')
  config.model.video.frame_differences = True
  model, params = _model_and_params(config)
  width = config.model.image.width
  assert params['temporal']['difference_pos_embedding'].shape == (1, NUM_FRAMES - 1, width)
  clips = _clips(4, NUM_FRAMES)

  def by_hand(m, clips):  # The same composition, spelled out: frames and differences through the image tower.
    pixels = encoders.preprocess_images(clips, config.model.image_size)
    frames = m.image_tower(pixels.reshape((-1,) + pixels.shape[2:]))[0].reshape(4, NUM_FRAMES, width)
    diffs = pixels[:, 1:] - pixels[:, :-1]
    differences = m.image_tower(diffs.reshape((-1,) + diffs.shape[2:]))[0].reshape(4, NUM_FRAMES - 1, width)
    return m.image_head(m.temporal(frames, None, differences))

  expected = model.apply({'params': params}, clips, method=by_hand)
  np.testing.assert_allclose(_embed(model, params, clips), expected, rtol=1e-5, atol=1e-5)
  # The differences are read: other differences with the same frames give another clip feature.
  temporal = video.TemporalTransformer(NUM_FRAMES, 1, 4, 32, frame_differences=True)
  rng = np.random.default_rng(1)
  frames = rng.normal(size=(2, NUM_FRAMES, 16)).astype(np.float32)
  differences = rng.normal(size=(2, 2, NUM_FRAMES - 1, 16)).astype(np.float32)  # Two draws.
  variables = temporal.init(jax.random.key(0), frames, None, differences[0])
  one, other = (temporal.apply(variables, frames, None, d) for d in differences)
  assert np.abs(one - other).max() > 1e-2


def test_image_model_parameter_tree_is_unchanged():
  """The image model's params are the towers, heads and temperature alone, as before videos existed: the
  reference is built from the parts, without the model class. The temporal Transformer adds `temporal` only."""
  config = _video_config('mean')
  m, key = config.model, jax.random.key(0)
  reference = dict(
      image_tower=encoders.ViT(m.image.patch_size, m.image.width, m.image.depth, m.image.num_heads,
                               m.image.mlp_dim).init(key, jnp.zeros((1, 32, 32, 3)))['params'],
      text_tower=encoders.TextTransformer(50, m.text.max_len, m.text.width, m.text.depth, m.text.num_heads,
                                          m.text.mlp_dim).init(key, jnp.ones((1, 8), jnp.int32))['params'],
      image_head=matryoshka.NestedProjection(m.embed_dim).init(key, jnp.zeros((1, m.image.width)))['params'],
      text_head=matryoshka.NestedProjection(m.embed_dim).init(key, jnp.zeros((1, m.text.width)))['params'],
      log_temperature=jnp.zeros(()))
  shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)
  model, image_params = _model_and_params(config)
  assert shapes(image_params) == shapes(reference)
  _, video_params = _model_and_params(_video_config('transformer'))
  temporal = video_params.pop('temporal')
  assert shapes(video_params) == shapes(reference)
  assert temporal['pos_embedding'].shape == (1, NUM_FRAMES, m.image.width)
  assert sorted(temporal['encoder']) == ['block0', 'norm']
  # Images still take the image path in a model with the temporal Transformer, with the same function.
  model_t = train_step.create_model(_video_config('transformer'), vocab_size=50)
  images = _clips(4, 1)[:, 0]
  np.testing.assert_array_equal(_embed(model_t, dict(video_params, temporal=temporal), images),
                                _embed(model, video_params, images))


def _video_batch(config, seed):
  batch = _random_batch(config, 16, 50, seed=seed)
  batch['image'] = _clips(16, NUM_FRAMES, seed)
  return batch


@pytest.mark.parametrize('variant', ['in_batch', 'queue_kl'])
def test_video_train_steps_on_4_devices_match_1_device(variant):
  """The step sees embeddings only: clips [devices, b, T, H, W, 3] train through the same losses."""
  config = _video_config('transformer')
  if variant == 'in_batch':
    config.accumulation_steps = 2  # Micro-batches of clips as well.
    config.model.video.frame_differences = True  # As configs/video_default.py trains.
  else:
    config.contrastive.update(dict(queue_size=32, kl_weight=0.5, distill_weight=0.4, filter_noisy_pairs=True,
                                   filter_k=1.0, filter_warmup_steps=0))
  config_lib.validate(config)
  model = train_step.create_model(config, vocab_size=50)
  initial = train_step.create_train_state(config, model, jax.random.key(0))
  batches = [_video_batch(config, seed) for seed in range(2)]
  _, history4 = _train(config, initial, batches, 4)
  hosts1, history1 = _train(config, initial, batches, 1)
  keys = ['loss', 'loss_dim8', 'loss_dim64', 'grad_norm'] + (['loss_kl'] if variant == 'queue_kl' else [])
  for m4, m1 in zip(history4, history1):
    for key in keys:
      np.testing.assert_allclose(m4[key], m1[key], rtol=1e-4, atol=1e-6, err_msg=key)
  assert all(np.isfinite(m['loss']) and m['nonfinite'] == 0 for m in history1)
  # The temporal Transformer trains with the towers.
  assert not np.allclose(hosts1[-1].params['temporal']['pos_embedding'], initial.params['temporal']['pos_embedding'])
  if config.model.video.frame_differences:
    assert not np.allclose(hosts1[-1].params['temporal']['difference_pos_embedding'],
                           initial.params['temporal']['difference_pos_embedding'])


@pytest.mark.parametrize('field, value, message', [
    ('temporal', 'lstm', r"config.model.video.temporal='lstm' is not one of \('mean', 'transformer'\)"),
    ('depth', 0, r'config.model.video.depth=0 must be >= 1'),
    ('num_frames', 0, r'config.model.video.num_frames=0 must be >= 1'),
    ('num_heads', 3, r'config.model.video.num_heads=3 must be >= 0 .* divide config.model.image.width=64'),
    ('patch_grid', 3, r"config.model.video.patch_grid=3 must be 0, or with temporal='transformer' divide the 4 x 4"),
    ('frame_differences', True, r"frame_differences=True needs temporal='transformer', patch_grid=0 .*\(now 'mean'"),
])
def test_bad_video_fields_are_named(field, value, message):
  config = _video_config()
  config.model.video[field] = value
  with pytest.raises(errors.InputError, match=message):
    config_lib.validate(config)


def test_masked_vision_modeling_and_long_clips_are_refused():
  config = _video_config('transformer')
  model, params = _model_and_params(config)
  with pytest.raises(errors.InputError, match=r'A clip of 4 frames is longer than config.model.video.num_frames=3'):
    _embed(model, params, _clips(2, NUM_FRAMES + 1))
  config.mvlm.mvm_weight = 1.0
  mvm_model = train_step.create_model(config, vocab_size=50)
  with pytest.raises(errors.InputError, match=r'mvm_weight > 0 with video inputs'):
    jax.eval_shape(lambda: train_step.init_params(config, mvm_model, jax.random.key(0)))
