"""Sharded momentum queues: the distributed softmax equals one device holding the whole queue.

Every numpy reference below is written plainly over the replicated queue (float64, row by row), and the
sharded computations run under pmap on 1, 2 and 4 simulated devices.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hivlp_jax import losses
from hivlp_jax import queues
from hivlp_jax import settings
from tests.conftest import tiny_config

AXIS = 'batch'


def _log_softmax(row):
  top = row.max()
  return row - (top + np.log(np.sum(np.exp(row - top))))


def _prefix(x, dim):
  """matryoshka.normalized_prefix in numpy (same eps)."""
  x = x[:, :dim]
  return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1e-6)


def numpy_momentum_loss(image, text, momentum_image, momentum_text, queue_image, queue_text, filled,
                        temperature, dims, weights, keep, distill_weight=None, kl_weight=0.0,
                        kl_direction='symmetric'):
  """The loss with one replicated queue: each kept pair i against [momentum global batch, filled slots]."""
  total = 0.0
  for dim, weight in zip(dims, weights):
    img, txt = _prefix(image, dim), _prefix(text, dim)
    key_img, key_txt = _prefix(momentum_image, dim), _prefix(momentum_text, dim)
    queue_img, queue_txt = _prefix(queue_image[filled], dim), _prefix(queue_text[filled], dim)
    batch = len(image)
    itc_sum = kl_sum = 0.0
    for i in np.flatnonzero(keep):
      rows = {'i2t': np.concatenate([key_txt @ img[i], queue_txt @ img[i]]) / temperature,
              't2i': np.concatenate([key_img @ txt[i], queue_img @ txt[i]]) / temperature}
      targets = {'i2t': np.concatenate([key_txt @ key_img[i], queue_txt @ key_img[i]]) / temperature,
                 't2i': np.concatenate([key_img @ key_txt[i], queue_img @ key_txt[i]]) / temperature}
      for name in ('i2t', 't2i'):
        log_p = _log_softmax(rows[name])
        pair_loss = -log_p[i]
        if distill_weight is not None:
          soft = -np.sum(np.exp(_log_softmax(targets[name])) * log_p)
          pair_loss = (1 - distill_weight) * pair_loss + distill_weight * soft
        itc_sum += pair_loss / 2
      # The KL supports: pair i first, then the queue slots (aligned between the two queues).
      log_p_i2t = _log_softmax(np.concatenate([[rows['i2t'][i]], rows['i2t'][batch:]]))
      log_p_t2i = _log_softmax(np.concatenate([[rows['t2i'][i]], rows['t2i'][batch:]]))
      kl_i2t_t2i = np.sum(np.exp(log_p_i2t) * (log_p_i2t - log_p_t2i))
      kl_t2i_i2t = np.sum(np.exp(log_p_t2i) * (log_p_t2i - log_p_i2t))
      kl_sum += {'i2t_t2i': kl_i2t_t2i, 't2i_i2t': kl_t2i_i2t,
                 'symmetric': (kl_i2t_t2i + kl_t2i_i2t) / 2}[kl_direction]
    kept = max(int(np.sum(keep)), 1)
    total += weight * (itc_sum / kept + kl_weight * kl_sum / kept)
  return total


def _inputs(global_batch=8, embed_dim=8, queue_size=16, seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.normal(size=shape)
  filled = np.ones(queue_size, bool)
  filled[[1, 6, 11]] = False  # Some empty slots, as early in training.
  return dict(image=normal(global_batch, embed_dim), text=normal(global_batch, embed_dim),
              momentum_image=normal(global_batch, embed_dim), momentum_text=normal(global_batch, embed_dim),
              queue_image=normal(queue_size, embed_dim), queue_text=normal(queue_size, embed_dim), filled=filled)


def _queue_settings(distill_weight=0.0, kl_weight=0.0, kl_direction='symmetric'):
  return settings.QueueSettings(
      size=16, momentum=0.99, momentum_schedule='constant', distill_weight=distill_weight, distill_warmup_steps=0,
      kl_weight=kl_weight, kl_direction=kl_direction, kl_stop_gradient='none', filter_noisy_pairs=True, filter_k=1.0,
      filter_stats_momentum=0.99, filter_warmup_steps=0)


def _sharded_loss_and_grads(num_devices, inputs, temperature, dims, weights, keep, **options):
  """Pmapped loss of the mean over devices and d(global loss)/d(online embeddings) [B, D] each."""
  devices = jax.local_devices()[:num_devices]
  host_queue = queues.QueueState(image=inputs['queue_image'].astype(np.float32),
                                 text=inputs['queue_text'].astype(np.float32), filled=inputs['filled'],
                                 position=np.zeros((), np.int32))
  shards = queues.global_to_shards(host_queue, devices, devices, AXIS)
  split = lambda x: np.asarray(x).reshape((num_devices, -1) + x.shape[1:])
  as32 = lambda x: np.asarray(x, np.float32)

  def device_loss(local_image, local_text, momentum_image, momentum_text, shard, local_keep):
    global_image = jax.lax.all_gather(local_image, AXIS, tiled=True)
    global_text = jax.lax.all_gather(local_text, AXIS, tiled=True)
    loss, _ = losses.contrastive_loss(
        losses.Pair(local_image, local_text), losses.Pair(global_image, global_text),
        losses.Pair(momentum_image, momentum_text), temperature, dims, weights, axis_name=AXIS, queue=shard,
        options=_queue_settings(**options), keep=local_keep, distill_weight=options.get('distill_weight'))
    return loss

  def step(*args):
    loss, grads = jax.value_and_grad(device_loss, argnums=(0, 1))(*args)
    return jax.lax.pmean(loss, AXIS), grads

  loss, (image_grad, text_grad) = jax.pmap(step, AXIS, in_axes=(0, 0, None, None, 0, 0), devices=devices)(
      split(as32(inputs['image'])), split(as32(inputs['text'])), as32(inputs['momentum_image']),
      as32(inputs['momentum_text']), shards, split(keep))
  # Each device's gradient is that of the sum of the device losses; the global loss is their mean.
  merge = lambda g: np.asarray(g).reshape((-1,) + g.shape[2:]) / num_devices
  return float(loss[0]), merge(image_grad), merge(text_grad)


def _numpy_gradient(fn, x, step=1e-6):
  """Central differences of a float64 scalar function of an array."""
  grad = np.zeros_like(x)
  for index in np.ndindex(x.shape):
    plus, minus = x.copy(), x.copy()
    plus[index] += step
    minus[index] -= step
    grad[index] = (fn(plus) - fn(minus)) / (2 * step)
  return grad


OPTIONS = {
    'plain': dict(options={}, keep=np.ones(8, bool)),
    'cots': dict(options=dict(distill_weight=0.4, kl_weight=0.7, kl_direction='symmetric'),
                 keep=np.array([1, 1, 0, 1, 1, 1, 0, 1], bool)),
}


@pytest.mark.parametrize('variant', sorted(OPTIONS))
@pytest.mark.parametrize('num_devices', [1, 2, 4])
def test_sharded_queue_loss_and_gradients_equal_replicated_numpy(num_devices, variant):
  inputs, temperature, dims, weights = _inputs(), 0.2, (4, 8), (0.5, 1.0)
  options, keep = OPTIONS[variant]['options'], OPTIONS[variant]['keep']
  loss, image_grad, text_grad = _sharded_loss_and_grads(num_devices, inputs, temperature, dims, weights,
                                                        keep, **options)
  reference = functools.partial(numpy_momentum_loss, temperature=temperature, dims=dims, weights=weights,
                                keep=keep, **options)
  fixed = {k: v for k, v in inputs.items() if k not in ('image', 'text')}
  expected = reference(inputs['image'], inputs['text'], **fixed)
  np.testing.assert_allclose(loss, expected, rtol=2e-5)
  expected_image_grad = _numpy_gradient(lambda x: reference(x, inputs['text'], **fixed), inputs['image'])
  expected_text_grad = _numpy_gradient(lambda x: reference(inputs['image'], x, **fixed), inputs['text'])
  scale = np.abs(expected_image_grad).max()
  assert scale > 1e-3
  np.testing.assert_allclose(image_grad, expected_image_grad, rtol=1e-3, atol=1e-5 * scale)
  np.testing.assert_allclose(text_grad, expected_text_grad, rtol=1e-3, atol=1e-5 * scale)
  # Dropped pairs get no gradient of their own (they are still negatives, but not of themselves here:
  # the online embeddings enter only as queries).
  np.testing.assert_array_equal(image_grad[~keep], 0.0)


@pytest.mark.parametrize('direction', settings.KL_DIRECTIONS)
def test_task_kl_equals_numpy_for_each_direction(direction):
  """KL over [pair i, queue shard]: 2 devices, 3 rows each, 5 slots each."""
  rng = np.random.default_rng(3)
  num_devices, local_batch, slots = 2, 3, 5
  batch = 2 * rng.normal(size=(2, num_devices * local_batch, 1)).astype(np.float32)  # i2t, t2i positives
  queue = 2 * rng.normal(size=(2, num_devices, num_devices * local_batch, slots)).astype(np.float32)

  def device_kl(batch_i2t, batch_t2i, queue_i2t, queue_t2i):
    return losses.task_kl(queues.Logits(batch_i2t, queue_i2t), queues.Logits(batch_t2i, queue_t2i), direction,
                          'none', AXIS)

  kl = jax.pmap(device_kl, AXIS, devices=jax.local_devices()[:num_devices])(
      batch[0].reshape(num_devices, local_batch, 1), batch[1].reshape(num_devices, local_batch, 1),
      queue[0], queue[1])
  expected = []
  for row in range(num_devices * local_batch):
    # The replicated support of the row: its positive, then device 0's slots, then device 1's.
    log_p = _log_softmax(np.concatenate([batch[0, row], queue[0, :, row].reshape(-1)]).astype(np.float64))
    log_q = _log_softmax(np.concatenate([batch[1, row], queue[1, :, row].reshape(-1)]).astype(np.float64))
    forward, reverse = np.sum(np.exp(log_p) * (log_p - log_q)), np.sum(np.exp(log_q) * (log_q - log_p))
    expected.append({'i2t_t2i': forward, 't2i_i2t': reverse, 'symmetric': (forward + reverse) / 2}[direction])
  np.testing.assert_allclose(np.asarray(kl).reshape(-1), expected, rtol=1e-5, atol=1e-6)


def test_kl_stop_gradient_target_blocks_the_first_argument():
  rng = np.random.default_rng(4)
  p_batch, q_batch = rng.normal(size=(1, 2, 1)).astype(np.float32), rng.normal(size=(1, 2, 1)).astype(np.float32)
  p_queue, q_queue = rng.normal(size=(1, 2, 4)).astype(np.float32), rng.normal(size=(1, 2, 4)).astype(np.float32)

  def grads(stop):
    def total(p_b, p_q, q_b, q_q):
      return jnp.sum(losses.task_kl(queues.Logits(p_b, p_q), queues.Logits(q_b, q_q), 'i2t_t2i', stop, AXIS))
    return jax.pmap(jax.grad(total, argnums=(0, 1, 2, 3)), AXIS, devices=jax.local_devices()[:1])(
        p_batch, p_queue, q_batch, q_queue)

  free, stopped = grads('none'), grads('target')
  assert np.abs(free[0]).max() > 0 and np.abs(free[1]).max() > 0
  np.testing.assert_array_equal(stopped[0], 0.0)
  np.testing.assert_array_equal(stopped[1], 0.0)
  np.testing.assert_allclose(stopped[3], free[3], rtol=1e-6)


def test_logsumexp_ignores_empty_slots_and_survives_an_empty_queue():
  batch_logits = np.array([[[1.0, 2.0]]], np.float32)  # 1 device, 1 row, 2 batch columns.
  for filled, extra in (([False, False, False], []), ([True, False, True], [0.5, 3.0])):
    queue = np.where(np.array(filled), np.array([0.5, 100.0, 3.0], np.float32), queues.EMPTY_SLOT_LOGIT)
    lse = jax.pmap(lambda b, q: queues.logsumexp(queues.Logits(b, q), AXIS), AXIS,
                   devices=jax.local_devices()[:1])(batch_logits, queue[None, None])
    np.testing.assert_allclose(lse[0, 0], np.log(np.sum(np.exp([1.0, 2.0] + extra))), rtol=1e-6)


def _simulate_sharded_ring(queue_size, num_devices, batches, keeps):
  """Plain model of the sharded ring: device d's row j goes to host slot d * S + position / n + j."""
  image = np.zeros(queue_size)
  text = np.zeros(queue_size)
  filled = np.zeros(queue_size, bool)
  slots_per_device = queue_size // num_devices
  position = 0
  for pair_ids, keep in zip(batches, keeps):
    local_batch = len(pair_ids) // num_devices
    for d in range(num_devices):
      for j in range(local_batch):
        row = d * local_batch + j
        if keep[row]:
          slot = d * slots_per_device + position // num_devices + j
          image[slot], text[slot], filled[slot] = pair_ids[row], -pair_ids[row], True
    position = (position + len(pair_ids)) % queue_size
  return image, text, filled, position


@pytest.mark.parametrize('num_devices', [1, 4])
def test_queue_wraps_around_and_keeps_slots_aligned(num_devices):
  """Eleven steps of 8 pairs into a ring of 24: wraps three times; dropped pairs keep the old slot."""
  queue_size, global_batch, embed_dim, steps = 24, 8, 3, 11
  rng = np.random.default_rng(5)
  devices = jax.local_devices()[:num_devices]
  enqueue = jax.pmap(functools.partial(queues.enqueue, axis_name=AXIS), AXIS, devices=devices)
  state = queues.global_to_shards(queues.init(queue_size, embed_dim), devices, devices, AXIS)
  batches, keeps = [], []
  for step in range(steps):
    pair_ids = 1.0 + step * global_batch + np.arange(global_batch)
    keep = rng.random(global_batch) > 0.25
    batches.append(pair_ids)
    keeps.append(keep)
    # Image row = +id, text row = -id in every coordinate, so a slot's two rows name their pair.
    image_keys = np.repeat(pair_ids[:, None], embed_dim, axis=1).astype(np.float32)
    split = lambda x: x.reshape((num_devices, -1) + x.shape[1:])
    # One step in flight: queued pmapped collectives can deadlock on the CPU (hivlp_jax/steps_in_flight.py).
    state = jax.block_until_ready(enqueue(state, split(image_keys), split(-image_keys), split(keep)))
  host = queues.shards_to_global(state, devices)
  image, text, filled, position = _simulate_sharded_ring(queue_size, num_devices, batches, keeps)
  np.testing.assert_array_equal(np.asarray(host.image), np.repeat(image[:, None], embed_dim, axis=1))
  np.testing.assert_array_equal(np.asarray(host.text), -np.asarray(host.image))  # Slot k: one pair.
  np.testing.assert_array_equal(np.asarray(host.text)[:, 0], text)
  np.testing.assert_array_equal(np.asarray(host.filled), filled)
  assert int(host.position) == position == (steps * global_batch) % queue_size
  # Without drops a slot would hold one of the last 3 steps' pairs; a dropped pair's slot is older.
  last_ids = set(np.concatenate(batches[-3:])[np.concatenate(keeps[-3:])])
  assert last_ids <= set(np.asarray(host.image)[:, 0])
  assert not set(np.concatenate(batches[-3:])[~np.concatenate(keeps[-3:])]) & set(np.asarray(host.image)[:, 0])


def test_global_to_shards_and_back_round_trip():
  devices = jax.local_devices()[:3]
  state = queues.init(12, 2).replace(position=jnp.asarray(4, jnp.int32))
  state = state.replace(image=jnp.arange(24.0).reshape(12, 2))
  shards = queues.global_to_shards(state, devices, devices, AXIS)
  np.testing.assert_array_equal(np.asarray(shards.image)[1], np.arange(8.0, 16.0).reshape(4, 2))  # Slots 4-7.
  merged = queues.shards_to_global(shards, devices)
  np.testing.assert_array_equal(merged.image, state.image)
  assert int(merged.position) == 4 and merged.position.shape == ()
  with pytest.raises(ValueError, match='cannot be split over 3 devices evenly'):
    queues.global_to_shards(queues.init(10, 2), devices, devices, AXIS)


def test_queue_size_must_be_a_multiple_of_the_global_batch():
  config = tiny_config('unused')
  config.batch_size, config.contrastive.queue_size = 32, 100
  with pytest.raises(ValueError, match=r'queue_size=100 must be a positive multiple of the global batch'):
    settings.QueueSettings.from_config(config)
  config.contrastive.queue_size = 96
  assert settings.QueueSettings.from_config(config).size == 96
