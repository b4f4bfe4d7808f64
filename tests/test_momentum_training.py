"""The train step with momentum queues, distillation, KL alignment, the filter and MVLM: 4 devices equal 1."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from hivlp_jax import config_lib
from hivlp_jax import masking
from hivlp_jax import queues
from hivlp_jax import replication
from hivlp_jax import train_step
from tests.conftest import tiny_config
from tests.test_train import _random_batch


def _cots_config():
  config = tiny_config('unused')  # No data is read: batches are random.
  config.model.nested_dims, config.loss.dim_weights = (8, 64), (1.0, 1.0)
  config.model.image.depth = config.model.text.depth = 1  # Compiles faster; the towers do not matter here.
  config.batch_size = 16
  config.optimizer.warmup_steps = 1
  config.contrastive.queue_size = 32
  config.contrastive.distill_weight = 0.4
  config.contrastive.distill_warmup_steps = 2
  config.contrastive.kl_weight = 0.5
  config.contrastive.filter_noisy_pairs = True
  config.contrastive.filter_k = 1.0
  config.contrastive.filter_warmup_steps = 0  # Drop from step 1: the filter's arithmetic is under test.
  config.mvlm.mlm_weight = config.mvlm.mvm_weight = 1.0  # Token level too: MVLM shares the online pass.
  config.visual_tokenizer.codes_file = 'unused.npy'  # Batches carry random codes; nothing is read.
  config_lib.validate(config)
  return config


def _with_masks(config, batch, seed):
  """Random visual-token ids and the MLM/MVM masks of the config (vocabulary of 50)."""
  rng = np.random.default_rng(seed)
  grid = config.model.image_size // config.model.image.patch_size
  batch['image_codes'] = rng.integers(0, config.visual_tokenizer.codebook_size, (16, grid * grid)).astype(np.int32)
  return masking.mask_batch(rng, batch, text_mask_ratio=0.3, image_mask_ratio=0.4, min_block_patches=2,
                            grid=(grid, grid), mask_id=4, vocab_size=50, special_ids=(0, 1, 2, 3, 4),
                            mask_text_tokens=True, mask_patches=True)


def _train(config, initial, batches, num_devices):
  devices = jax.local_devices()[:num_devices]
  state = replication.replicate_state(initial, devices)
  p_step = train_step.make_pmapped_train_step(config, devices=devices)
  history, hosts = [], []
  for batch in batches:
    state, metrics = p_step(state, jax.tree.map(lambda x: x.reshape((num_devices, -1) + x.shape[1:]), batch))
    history.append(jax.tree.map(lambda m: float(m[0]), metrics))
    hosts.append(replication.unreplicate_state(state))
  return hosts, history


def test_train_steps_with_queues_on_4_devices_match_1_device(tmp_path):
  config = _cots_config()
  model = train_step.create_model(config, vocab_size=50)
  batches = [_with_masks(config, _random_batch(config, 16, 50, seed=seed), seed) for seed in range(3)]
  for seed, batch in enumerate(batches):  # Known-noisy bits, as the noisy-pair data option provides.
    batch['noisy'] = np.random.default_rng(seed).random(16) < 0.3
  initial = train_step.create_train_state(config, model, jax.random.key(0))
  hosts4, history4 = _train(config, initial, batches, 4)
  hosts1, history1 = _train(config, initial, batches, 1)

  keys = ('loss', 'loss_itc', 'loss_kl', 'loss_dim8', 'loss_dim64', 'kl_dim8', 'grad_norm', 'temperature',
          'filter_dropped_fraction', 'filter_mean', 'queue_filled_fraction', 'distill_weight', 'momentum',
          'filter_flagged_noisy', 'filter_dropped_clean', 'loss_mlm', 'accuracy_mlm', 'loss_mvm', 'accuracy_mvm')
  for m4, m1 in zip(history4, history1):
    for key in keys:
      np.testing.assert_allclose(m4[key], m1[key], rtol=1e-4, atol=1e-6, err_msg=key)
  assert all(np.isfinite(m['loss']) and m['nonfinite'] == 0 for m in history1)
  for m in history1:  # The step's loss is the sum of the instance-, task- and token-level terms.
    np.testing.assert_allclose(m['loss'], m['loss_itc'] + 0.5 * m['loss_kl'] + m['loss_mlm'] + m['loss_mvm'],
                               rtol=1e-5)
  # At initialisation the masked-token heads are near uniform: cross-entropy near log(classes).
  assert history1[0]['loss_mlm'] == pytest.approx(np.log(50), rel=0.25)
  assert history1[0]['loss_mvm'] == pytest.approx(np.log(config.visual_tokenizer.codebook_size), rel=0.25)
  assert [m['distill_weight'] for m in history1] == pytest.approx([0.0, 0.2, 0.4])
  # The queue holds 2 global batches: empty at step 1, then the pairs the filter kept.
  dropped = [m['filter_dropped_fraction'] for m in history1]
  assert 0 < max(dropped) < 0.5
  for m, batch in zip(history1, batches):  # The flag rates split the dropped pairs into noisy and clean.
    num_noisy = batch['noisy'].sum()
    np.testing.assert_allclose(m['filter_flagged_noisy'] * num_noisy + m['filter_dropped_clean'] * (16 - num_noisy),
                               m['filter_dropped_fraction'] * 16, rtol=1e-5, atol=1e-5)
  expected_filled = [0.0, (1 - dropped[0]) / 2, (2 - dropped[0] - dropped[1]) / 2]
  np.testing.assert_allclose([m['queue_filled_fraction'] for m in history1], expected_filled, atol=1e-6)
  for host in (hosts1[-1], hosts4[-1]):
    # Slots of step 3's dropped pairs keep step 1's pair, or stay empty if it was dropped too.
    assert 16 * (2 - dropped[1] - dropped[2]) <= int(host.negative_queues.filled.sum()) <= 32
    assert int(host.negative_queues.position) == (3 * 16) % 32
  np.testing.assert_array_equal(np.sort(hosts4[-1].negative_queues.filled), np.sort(hosts1[-1].negative_queues.filled))

  # The EMA after the first step: m * initial + (1 - m) * the updated online params.
  m = config.contrastive.momentum
  for ema, start, online in zip(jax.tree.leaves(hosts1[0].ema_params), jax.tree.leaves(initial.params),
                                jax.tree.leaves(hosts1[0].params)):
    np.testing.assert_allclose(ema, m * np.asarray(start) + (1 - m) * np.asarray(online), rtol=1e-6, atol=1e-7)

  # The saved state (queues as one global array over the 4 shards, bool mask, 0-d counters) restores, also
  # sharded over another number of devices, and trains on from there like the uninterrupted run.
  manager = ocp.CheckpointManager(os.path.abspath(tmp_path / 'checkpoints'),
                                  options=ocp.CheckpointManagerOptions(create=True))
  manager.save(2, args=ocp.args.StandardSave(hosts4[1]))
  manager.wait_until_finished()
  two_devices = jax.local_devices()[:2]
  target = initial.replace(negative_queues=queues.host_to_global(initial.negative_queues, two_devices))
  restored = manager.restore(2, args=ocp.args.StandardRestore(target))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(hosts4[1])):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  assert restored.negative_queues.filled.dtype == np.bool_ and restored.negative_queues.position.shape == ()
  assert restored.negative_queues.image.sharding.device_set == set(two_devices)
  state = replication.replicate_state(restored, two_devices)
  _, resumed = train_step.make_pmapped_train_step(config, devices=two_devices)(
      state, jax.tree.map(lambda x: x.reshape((2, -1) + x.shape[1:]), batches[2]))
  for key in keys:
    np.testing.assert_allclose(float(resumed[key][0]), history1[2][key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_contrastive_config_errors_name_the_field():
  config = tiny_config('unused')
  config.contrastive.queue_size = 40
  with pytest.raises(ValueError, match=r'queue_size=40 must be a positive multiple of the global batch'):
    config_lib.validate(config)
  config.contrastive.queue_size = 0
  config.contrastive.kl_weight = 1.0
  with pytest.raises(ValueError, match=r'kl_weight=1.0 needs the momentum queues'):
    config_lib.validate(config)
  config.contrastive.queue_size = 64
  config.contrastive.kl_direction = 'backwards'
  with pytest.raises(ValueError, match=r"kl_direction='backwards' is not one of"):
    config_lib.validate(config)
