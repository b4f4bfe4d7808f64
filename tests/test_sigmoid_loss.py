"""The SigLIP sigmoid loss (config.loss.kind='sigmoid'): its definition, its ring over devices, training, refusals."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hivlp_jax import losses
from hivlp_jax import replication
from hivlp_jax import settings
from hivlp_jax import train_step
from hivlp_jax.models import matryoshka
from tests.conftest import tiny_config

AXIS = replication.AXIS


def numpy_sigmoid_loss(image, text, temperature, bias):
  """-1/B sum_ij log sigmoid(z_ij (cos_ij / temperature + bias)), z = +1 on the diagonal, -1 elsewhere."""
  image = image / np.linalg.norm(image, axis=-1, keepdims=True)
  text = text / np.linalg.norm(text, axis=-1, keepdims=True)
  z = 2.0 * np.eye(len(image)) - 1.0
  return np.sum(np.logaddexp(0.0, -z * (image @ text.T / temperature + bias))) / len(image)  # -log sigmoid(x).


def test_sigmoid_loss_equals_numpy_at_every_nested_dim():
  rng = np.random.default_rng(0)
  image, text = rng.normal(size=(6, 32)), rng.normal(size=(6, 32))
  dims, weights, temperature, bias = (4, 8, 32), (0.5, 1.0, 2.0), 0.3, -1.5
  pair = losses.Pair(jnp.asarray(image, jnp.float32), jnp.asarray(text, jnp.float32))
  total, metrics = losses.sigmoid_loss(pair, temperature, bias, dims, weights)
  expected = [numpy_sigmoid_loss(image[:, :d], text[:, :d], temperature, bias) for d in dims]
  for d, e in zip(dims, expected):
    np.testing.assert_allclose(metrics[f'loss_dim{d}'], e, rtol=1e-5)
  np.testing.assert_allclose(total, sum(w * e for w, e in zip(weights, expected)), rtol=1e-5)
  orthogonal = jnp.eye(6, 32)  # Logits of +980 (pairs) and -20 (the rest): stable, and near 0.
  aligned, aligned_metrics = losses.sigmoid_loss(losses.Pair(orthogonal, orthogonal), 0.001, -20.0, (32,), (1.0,))
  assert 0.0 <= float(aligned) < 1e-6 and float(aligned_metrics['accuracy_i2t_dim32']) == 1.0


def _gathered_sigmoid_loss(online, temperature, bias, dims, weights):
  """The all-gathered form under pmap: this device's images against every text of the global batch."""
  texts = jax.lax.all_gather(online.text, AXIS, tiled=True)  # [B, D]
  rows = jax.lax.axis_index(AXIS) * online.image.shape[0] + jnp.arange(online.image.shape[0])
  z = jnp.where(rows[:, None] == jnp.arange(texts.shape[0])[None, :], 1.0, -1.0)  # [b, B]
  total = 0.0
  for dim, weight in zip(dims, weights):
    logits = matryoshka.normalized_prefix(online.image, dim) @ matryoshka.normalized_prefix(texts, dim).T
    total += weight * -jnp.sum(jax.nn.log_sigmoid(z * (logits / temperature + bias))) / online.image.shape[0]
  return total


def test_ring_form_equals_the_all_gathered_form_on_4_devices():
  """Loss and gradients (embeddings, temperature, bias) of each device; their mean is the one-batch loss."""
  rng = np.random.default_rng(1)
  image, text = rng.normal(size=(12, 16)).astype(np.float32), rng.normal(size=(12, 16)).astype(np.float32)
  dims, weights = (4, 16), (1.0, 0.5)
  scalars = np.full(4, 0.5, np.float32), np.full(4, -1.0, np.float32)

  def per_device(loss):
    def value(image, text, temperature, bias):
      return loss(losses.Pair(image, text), temperature, bias, dims, weights)
    return jax.pmap(jax.value_and_grad(value, argnums=(0, 1, 2, 3)), AXIS)

  ring = lambda *args: losses.sigmoid_loss(*args, axis_name=AXIS)[0]
  inputs = (image.reshape(4, 3, 16), text.reshape(4, 3, 16)) + scalars
  ring_loss, ring_grads = per_device(ring)(*inputs)
  gathered_loss, gathered_grads = per_device(_gathered_sigmoid_loss)(*inputs)
  np.testing.assert_allclose(ring_loss, gathered_loss, rtol=1e-5)
  for name, r, g in zip(('image', 'text', 'temperature', 'bias'), ring_grads, gathered_grads):
    assert np.abs(g).max() > 0, name
    np.testing.assert_allclose(r, g, rtol=1e-4, atol=1e-6, err_msg=name)
  expected = sum(w * numpy_sigmoid_loss(image[:, :d], text[:, :d], 0.5, -1.0) for d, w in zip(dims, weights))
  np.testing.assert_allclose(np.mean(ring_loss), expected, rtol=1e-5)
  # The texts travel and are never gathered (the check does see the gathered form's all_gather).
  assert 'all_gather' not in str(jax.make_jaxpr(per_device(ring))(*inputs))
  assert 'all_gather' in str(jax.make_jaxpr(per_device(_gathered_sigmoid_loss))(*inputs))


def test_a_few_sigmoid_steps_on_4_devices_decrease_the_loss():
  """configs/tiny.py with depth-1 towers, one batch seen 4 times; the softmax model's parameters stay as they were."""
  softmax_config = tiny_config('unused')
  softmax_model = train_step.create_model(softmax_config, vocab_size=50)
  softmax_params = jax.eval_shape(functools.partial(train_step.init_params, softmax_config, softmax_model),
                                  jax.random.key(0))
  assert 'log_temperature' in softmax_params and not any('sigmoid' in name for name in softmax_params)
  config = tiny_config('unused')
  config.loss.kind = 'sigmoid'
  config.model.image.depth = config.model.text.depth = 1
  config.optimizer.warmup_steps = 0
  assert settings.StepSettings.from_config(config).loss_kind == 'sigmoid'
  model = train_step.create_model(config, vocab_size=50)
  state = train_step.create_train_state(config, model, jax.random.key(0))
  assert 'log_temperature' not in state.params  # The softmax's; SigLIP's t' and b start at log 10 and -10.
  assert float(state.params['sigmoid_log_scale']) == pytest.approx(np.log(10.0))
  assert float(state.params['sigmoid_bias']) == -10.0
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (4, 8, 32, 32, 3), dtype=np.uint8),  # 4 devices x 8 of one batch.
           'text': rng.integers(5, 50, (4, 8, config.model.text.max_len), dtype=np.int32)}
  p_step = train_step.make_pmapped_train_step(config)
  state, history = replication.replicate_state(state), []  # The step's own layout: one compile, not two.
  for _ in range(4):
    state, metrics = p_step(state, batch)
    history.append(float(metrics['loss'][0]))
  assert all(np.isfinite(history)) and float(metrics['nonfinite'][0]) == 0.0
  assert history[-1] < history[0] - 0.1, history
  assert {'loss_dim8', 'loss_dim64', 'accuracy_i2t_dim64', 'logit_bias', 'temperature'} <= set(metrics)
  assert float(metrics['logit_bias'][0]) > -10.0  # The bias learns (positives pull it up first).


@pytest.mark.parametrize('fields', [dict(queue_size=64), dict(queue_size=64, kl_weight=1.0, filter_noisy_pairs=True),
                                    dict(distill_weight=0.4)])
def test_sigmoid_loss_with_options_it_cannot_serve_is_refused_naming_them(fields):
  """In the settings, which config_lib.validate builds at start-up."""
  config = tiny_config('unused')
  config.loss.kind = 'sigmoid'
  config.contrastive.update(fields)
  named = '.*'.join(re.escape(f'config.contrastive.{k}={v!r}') for k, v in fields.items())
  with pytest.raises(ValueError, match=rf"config\.loss\.kind='sigmoid' cannot serve {named}"):
    settings.StepSettings.from_config(config)


def test_unknown_loss_kind_is_refused():
  config = tiny_config('unused')
  config.loss.kind = 'siglip'
  with pytest.raises(ValueError, match=r"config\.loss\.kind='siglip' is not one of \('softmax', 'sigmoid'\)"):
    settings.StepSettings.from_config(config)
