"""Gradient accumulation (GradCache): a step over k micro-batches equals the one-shot step on the same batch."""

import functools

import jax
import numpy as np
import pytest

from hivlp_jax import config_lib
from hivlp_jax import errors
from hivlp_jax import replication
from hivlp_jax import settings
from hivlp_jax import train_step
from tests.conftest import tiny_config
from tests.test_momentum_training import _cots_config
from tests.test_momentum_training import _train
from tests.test_momentum_training import _with_masks
from tests.test_train import _random_batch

# float32: the micro-batches' gradients are summed in another order than one pass adds them up.
RTOL, ATOL = 2e-4, 1e-6


def _assert_trees_close(got, want, what, skip=()):
  """Leaf by leaf; floats to RTOL and ATOL times the leaf's scale, the rest exactly; `skip`: path substrings."""
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    name = jax.tree_util.keystr(path)
    if any(part in name for part in skip):
      continue
    x, y = np.asarray(x), np.asarray(y)
    if not np.issubdtype(x.dtype, np.floating):
      np.testing.assert_array_equal(x, y, err_msg=f'{what}{name}')
    else:
      np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL * max(float(np.max(np.abs(y), initial=0.0)), 1.0),
                                 err_msg=f'{what}{name}')


def _assert_metrics_close(got, want, what):
  assert set(got) == set(want), what
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=RTOL, atol=ATOL, err_msg=f'{what}: {key}')


# Attention key biases have a zero gradient in exact arithmetic (softmax is shift-invariant), so Adam turns
# their round-off into full-size steps: the updated states are compared without them (the gradients with).
KEY_BIASES = ("['key']['bias']",)


def _with_steps(config, accumulation_steps):
  config = config.copy_and_resolve_references()
  config.accumulation_steps = accumulation_steps
  config_lib.validate(config)
  return config


def _loss_and_grads(config, state, batch, num_devices):
  """train_step.loss_and_grads on `num_devices`; per-device outputs (keys, keep) in global batch order."""
  devices = jax.local_devices()[:num_devices]
  fn = jax.pmap(functools.partial(train_step.loss_and_grads, settings=settings.StepSettings.from_config(config)),
                replication.AXIS, devices=devices)
  loss, metrics, grads, momentum = fn(replication.replicate_state(state, devices),
                                      jax.tree.map(lambda x: x.reshape((num_devices, -1) + x.shape[1:]), batch))
  first = lambda tree: jax.tree.map(lambda x: np.asarray(x[0]), tree)
  keys = jax.tree.map(lambda x: np.asarray(x).reshape((-1,) + x.shape[2:]), (momentum.keys, momentum.keep))
  return dict(loss=float(loss[0]), metrics=first(metrics), grads=first(grads), keys=keys,
              filter_stats=first(momentum.filter_stats))


def test_accumulated_cots_loss_and_gradient_equal_one_shot_on_1_and_4_devices():
  """Queues, distillation, KL, the filter, MLM and MVM, with an empty queue and with a filled one."""
  config = _cots_config()
  model = train_step.create_model(config, vocab_size=50)
  batches = [_with_masks(config, _random_batch(config, 16, 50, seed=seed), seed) for seed in range(2)]
  initial = train_step.create_train_state(config, model, jax.random.key(0))
  after_one, _ = _train(config, initial, batches[:1], 1)
  for state, batch, what in ((initial, batches[0], 'empty queue'), (after_one[0], batches[1], 'filled queue')):
    want = _loss_and_grads(config, state, batch, 1)
    assert 0 < want['metrics']['filter_dropped_fraction'] < 0.5, what  # The filter drops pairs here.
    # 4 micro-batches of 4 pairs on one device; of 1 pair on each of 4 devices (the filter sees the whole batch).
    for devices in (1, 4):
      got = _loss_and_grads(_with_steps(config, 4), state, batch, devices)
      where = f'{what}, {devices} devices: '
      np.testing.assert_allclose(got['loss'], want['loss'], rtol=RTOL, err_msg=where)
      _assert_metrics_close(got['metrics'], want['metrics'], where)
      _assert_trees_close(got['grads'], want['grads'], where + 'grads')
      _assert_trees_close(got['keys'], want['keys'], where + 'momentum keys')
      _assert_trees_close(got['filter_stats'], want['filter_stats'], where + 'filter statistics')


@pytest.mark.parametrize('loss_kind,devices,steps', [('softmax', 1, 4), ('sigmoid', 4, 2)])
def test_accumulated_in_batch_step_equals_one_shot(loss_kind, devices, steps):
  config = tiny_config('unused')
  config.loss.kind = loss_kind
  config.batch_size = 16
  config_lib.validate(config)
  initial = train_step.create_train_state(config, train_step.create_model(config, 50), jax.random.key(0))
  batches = [_random_batch(config, 16, 50, seed=seed) for seed in range(2)]
  want_states, want_metrics = _train(config, initial, batches, devices)
  states, metrics = _train(_with_steps(config, steps), initial, batches, devices)
  for step, (got, want) in enumerate(zip(metrics, want_metrics)):
    _assert_metrics_close(got, want, f'step {step + 1}')  # grad_norm and update_norm among them.
  _assert_trees_close(states[-1], want_states[-1], 'state', skip=KEY_BIASES)


def test_accumulation_steps_that_do_not_divide_the_per_device_batch_are_refused():
  config = tiny_config('unused')
  config.batch_size = 16  # 4 per device on the 4 simulated devices.
  config.accumulation_steps = 3
  with pytest.raises(errors.InputError, match=r'config.accumulation_steps=3 does not divide the per-device batch 4'):
    config_lib.validate(config)
  config.accumulation_steps = 0
  with pytest.raises(errors.InputError, match=r'config.accumulation_steps=0 must be >= 1'):
    config_lib.validate(config)
