"""Image-id positives (config.contrastive.image_id_positives): ALBEF's retrieval loss, sharded and in a real step.

The reference is ALBEF's `model_retrieval.py` written in numpy (float64):
  idx_all = cat([idx.t(), idx_queue]); pos_idx = eq(idx, idx_all); sim_targets = pos_idx / pos_idx.sum(1)
  loss_i2t = -sum(log_softmax(image_feat @ text_feat_all / temp) * sim_targets, 1).mean()   (t2i alike)
with empty queue slots left out of the support (ALBEF's queue starts full of random vectors instead).
"""

import jax
import numpy as np
import pytest

from hivlp_jax import errors
from hivlp_jax import losses
from hivlp_jax import queues
from hivlp_jax import replication
from hivlp_jax import train_step
from tests import test_momentum_training
from tests import test_queues
from tests.test_train import _random_batch

AXIS = 'batch'


def albef_loss(image, text, key_image, key_text, queue_image, queue_text, filled, ids, queue_ids, temperature):
  """(i2t + t2i) / 2 of ALBEF's retrieval loss over [keys of the global batch, filled queue slots]."""
  norm = lambda x: test_queues._prefix(x, x.shape[1])  # pylint: disable=protected-access
  img, txt, key_img, key_txt = norm(image), norm(text), norm(key_image), norm(key_text)
  support_txt = np.concatenate([key_txt, norm(queue_text)[filled]])
  support_img = np.concatenate([key_img, norm(queue_image)[filled]])
  ids_all = np.concatenate([ids, queue_ids[filled]])
  targets = (ids[:, None] == ids_all[None, :]).astype(np.float64)
  targets /= targets.sum(1, keepdims=True)
  log_softmax = lambda logits: logits - np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1,
                                                       keepdims=True)) - logits.max(1, keepdims=True)
  loss_i2t = -np.sum(log_softmax(img @ support_txt.T / temperature) * targets, 1).mean()
  loss_t2i = -np.sum(log_softmax(txt @ support_img.T / temperature) * targets, 1).mean()
  return (loss_i2t + loss_t2i) / 2


def _inputs(seed=0):
  """A global batch of 8 pairs showing 5 images (several captions of one image), a queue of 16 that holds
  other captions of the batch's images, and 3 empty slots, one of which carries a batch image's stale id."""
  inputs = test_queues._inputs(seed=seed)  # pylint: disable=protected-access
  ids = np.array([7, 7, 3, 9, 7, 3, 5, 11], np.int32)
  queue_ids = np.array([7, 5, 40, 3, 41, 42, 7, 43, 44, 9, 45, 7, 46, 47, 48, 49], np.int32)
  assert not inputs['filled'][6] and queue_ids[6] == 7  # An empty slot's id must not count.
  return inputs, ids, queue_ids


def _sharded(num_devices, inputs, ids, queue_ids, temperature, with_queue):
  """Loss (mean over devices) and d loss / d (online image, text) [B, D], under pmap."""
  devices = jax.local_devices()[:num_devices]
  host_queue = queues.QueueState(image=inputs['queue_image'].astype(np.float32),
                                 text=inputs['queue_text'].astype(np.float32), filled=inputs['filled'],
                                 position=np.zeros((), np.int32), image_ids=queue_ids)
  shards = queues.global_to_shards(host_queue, devices, devices, AXIS)
  split = lambda x: np.asarray(x).reshape((num_devices, -1) + x.shape[1:])
  as32 = lambda x: np.asarray(x, np.float32)

  def device_loss(local_image, local_text, key_image, key_text, shard, local_ids):
    online = losses.Pair(local_image, local_text)
    online_global = jax.tree.map(lambda x: jax.lax.all_gather(x, AXIS, tiled=True), online)
    keys = losses.Pair(key_image, key_text) if with_queue else online_global
    loss, _ = losses.contrastive_loss(
        online, online_global, keys, temperature, (8,), (1.0,), axis_name=AXIS,
        queue=shard if with_queue else None,
        options=test_queues._queue_settings() if with_queue else None,  # pylint: disable=protected-access
        image_ids=local_ids)
    return loss

  def step(*args):
    loss, grads = jax.value_and_grad(device_loss, argnums=(0, 1))(*args)
    return jax.lax.pmean(loss, AXIS), grads

  loss, grads = jax.pmap(step, AXIS, in_axes=(0, 0, None, None, 0, 0), devices=devices)(
      split(as32(inputs['image'])), split(as32(inputs['text'])), as32(inputs['momentum_image']),
      as32(inputs['momentum_text']), shards, split(ids))
  return float(loss[0]), [np.asarray(g).reshape((-1,) + g.shape[2:]) / num_devices for g in grads]


@pytest.mark.parametrize('with_queue', [False, True], ids=['in_batch', 'queue'])
def test_loss_equals_albef_formula_and_sharding_changes_nothing(with_queue):
  inputs, ids, queue_ids = _inputs()
  temperature = 0.2
  if with_queue:
    expected = albef_loss(inputs['image'], inputs['text'], inputs['momentum_image'], inputs['momentum_text'],
                          inputs['queue_image'], inputs['queue_text'], inputs['filled'], ids, queue_ids, temperature)
  else:  # In-batch: the keys are the online embeddings themselves, and there is no queue.
    none = np.zeros(len(queue_ids), bool)
    expected = albef_loss(inputs['image'], inputs['text'], inputs['image'], inputs['text'], inputs['queue_image'],
                          inputs['queue_text'], none, ids, queue_ids, temperature)
  results = {n: _sharded(n, inputs, ids, queue_ids, temperature, with_queue) for n in (1, 2, 4)}
  for num_devices, (loss, _) in results.items():
    assert loss == pytest.approx(expected, rel=1e-5), num_devices
  for num_devices in (2, 4):
    for sharded, single in zip(results[num_devices][1], results[1][1]):
      np.testing.assert_allclose(sharded, single, rtol=1e-4, atol=1e-6)


def test_distinct_ids_give_the_plain_loss():
  """With every image shown once (and no queue slot of a batch image), the targets are the pairs alone."""
  inputs, _, _ = _inputs()
  ids, queue_ids = np.arange(8, dtype=np.int32), np.arange(100, 116, dtype=np.int32)
  with_ids, _ = _sharded(2, inputs, ids, queue_ids, 0.2, with_queue=True)
  plain = test_queues.numpy_momentum_loss(
      inputs['image'], inputs['text'], inputs['momentum_image'], inputs['momentum_text'], inputs['queue_image'],
      inputs['queue_text'], inputs['filled'], 0.2, (8,), (1.0,), np.ones(8, bool))
  assert with_ids == pytest.approx(plain, rel=1e-5)


def _train(config, batches, num_devices):
  devices = jax.local_devices()[:num_devices]
  model = train_step.create_model(config, vocab_size=50)
  state = replication.replicate_state(train_step.create_train_state(config, model, jax.random.key(0)), devices)
  p_step = train_step.make_pmapped_train_step(config, devices=devices)
  history = []
  for batch in batches:
    state, metrics = p_step(state, jax.tree.map(lambda x: x.reshape((num_devices, -1) + x.shape[1:]), batch))
    history.append(jax.tree.map(lambda m: float(m[0]), metrics))
  return replication.unreplicate_state(state), history


def _config_and_batches():
  config = test_momentum_training._cots_config()  # pylint: disable=protected-access
  config.contrastive.image_id_positives = True
  # The filter would keep old pairs in the slots of dropped ones; MVLM only adds compile time here.
  config.contrastive.filter_noisy_pairs = False
  config.mvlm.mlm_weight = config.mvlm.mvm_weight = 0.0
  batches = []
  for seed in range(3):  # Two captions of each of 8 images per batch, new images each step.
    batch = _random_batch(config, 16, 50, seed=seed)
    batch['image_id'] = np.tile(np.arange(8, dtype=np.int32), 2) + 100 * seed
    batches.append(batch)
  return config, batches


def test_train_step_with_image_ids_and_a_queue_on_4_devices_matches_1_and_keeps_the_ids():
  """Real steps (queue, distillation, KL; two captions of each image in every batch): 4 devices equal 1,
  and the queue's slots hold the image ids of the pairs written there."""
  config, batches = _config_and_batches()
  host4, history4 = _train(config, batches, 4)
  host1, history1 = _train(config, batches, 1)
  for m4, m1 in zip(history4, history1):
    for key in ('loss', 'loss_itc', 'loss_kl', 'accuracy_i2t_dim64', 'grad_norm'):
      np.testing.assert_allclose(m4[key], m1[key], rtol=1e-4, atol=1e-6, err_msg=key)
  assert all(np.isfinite(m['loss']) for m in history1)
  # 32 slots, global batch 16: the last two steps' pairs. Devices lay their slots out differently.
  expected = np.sort(np.concatenate([batches[1]['image_id'], batches[2]['image_id']]))
  for host in (host1, host4):
    assert np.asarray(host.negative_queues.filled).all()
    np.testing.assert_array_equal(np.sort(np.asarray(host.negative_queues.image_ids)), expected)


def test_image_ids_are_asked_of_the_data():
  config, batches = _config_and_batches()
  batch = {k: v for k, v in batches[0].items() if k != 'image_id'}
  with pytest.raises(errors.InputError, match='image_id_positives=True needs image ids'):
    _train(config, [batch], 1)
