"""The train step and loop: sharded equals unsharded, resume equals uninterrupted, learning beats chance."""

import json
import os

import flax
import jax
import numpy as np
import optax
import pytest

from hivlp_jax import checkpointing
from hivlp_jax import config_lib
from hivlp_jax import errors
from hivlp_jax import evaluate
from hivlp_jax import replication
from hivlp_jax import settings
from hivlp_jax import steps_in_flight
from hivlp_jax import train
from hivlp_jax import train_step
from tests.conftest import tiny_config
from tests.test_steps_in_flight import RecordingStepsInFlight


def _random_batch(config, global_batch, vocab_size, seed=0):
  rng = np.random.default_rng(seed)
  size, max_len = config.model.image_size, config.model.text.max_len
  text = rng.integers(5, vocab_size, (global_batch, max_len)).astype(np.int32)
  text[:, 0] = 2
  text[:, rng.integers(8, max_len):] = 0  # Some padding, as in real captions.
  return {'image': rng.integers(0, 256, (global_batch, size, size, 3), dtype=np.uint8), 'text': text}


def _run_steps(config, model, batch, devices, steps):
  state = flax.jax_utils.replicate(train_step.create_train_state(config, model, jax.random.key(0)), devices)
  p_step = train_step.make_pmapped_train_step(config, devices=devices)
  sharded = jax.tree.map(lambda x: x.reshape((len(devices), -1) + x.shape[1:]), batch)
  history = []
  for _ in range(steps):
    state, metrics = p_step(state, sharded)
    history.append(jax.tree.map(lambda m: float(m[0]), metrics))
  return replication.unreplicate(state), history


def test_gradient_on_4_devices_equals_gradient_on_1_device(data_dir):
  """Same global batch of 16: 4 devices x 4 examples vs 1 device x 16, to float32 round-off."""
  config = tiny_config(data_dir)
  model = train_step.create_model(config, vocab_size=50)
  state = train_step.create_train_state(config, model, jax.random.key(0))
  batch = _random_batch(config, 16, 50)
  step_settings = settings.StepSettings.from_config(config)

  def grad_fn(state, batch):
    value_and_grad = jax.value_and_grad(train_step.loss_fn, has_aux=True)
    (loss, metrics), grads = value_and_grad(state.params, state, batch, step_settings, None, None, None)
    return jax.lax.pmean((loss, metrics), replication.AXIS), jax.lax.pmean(grads, replication.AXIS)

  results = {}
  for n in (4, 1):
    devices = jax.local_devices()[:n]
    sharded = jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), batch)
    results[n] = replication.unreplicate(
        jax.pmap(grad_fn, axis_name=replication.AXIS, devices=devices)(replication.replicate(state, devices),
                                                                       sharded))
  (loss4, metrics4), grads4 = results[4]
  (loss1, metrics1), grads1 = results[1]
  np.testing.assert_allclose(loss4, loss1, rtol=1e-5)
  for key in metrics1:
    np.testing.assert_allclose(metrics4[key], metrics1[key], rtol=1e-5, atol=1e-6, err_msg=key)
  scale = float(optax.tree.norm(grads1))
  assert scale > 0
  for (path, g4), g1 in zip(jax.tree_util.tree_leaves_with_path(grads4), jax.tree.leaves(grads1)):
    np.testing.assert_allclose(g4, g1, rtol=1e-4, atol=1e-6 * scale, err_msg=jax.tree_util.keystr(path))


def test_train_steps_on_4_devices_match_1_device(data_dir):
  """Three full steps (AdamW) on 4 vs 1 devices: the same losses and gradient norms."""
  config = tiny_config(data_dir)
  config.batch_size = 16
  config.optimizer.warmup_steps = 1
  model = train_step.create_model(config, vocab_size=50)
  batch = _random_batch(config, 16, 50)
  _, history4 = _run_steps(config, model, batch, jax.local_devices()[:4], steps=3)
  _, history1 = _run_steps(config, model, batch, jax.local_devices()[:1], steps=3)
  assert history1[2]['update_norm'] > 0 and history1[2]['loss'] < history1[0]['loss']
  for m4, m1 in zip(history4, history1):
    for key in ('loss', 'loss_dim8', 'loss_dim64', 'grad_norm', 'temperature'):
      np.testing.assert_allclose(m4[key], m1[key], rtol=1e-4, err_msg=key)


def test_nonfinite_step_is_skipped_and_counted(data_dir):
  config = tiny_config(data_dir)
  config.optimizer.warmup_steps = 1
  model = train_step.create_model(config, vocab_size=50)
  state = train_step.create_train_state(config, model, jax.random.key(0))
  state = state.replace(params=jax.tree.map(lambda x: x, state.params))
  bad_params = flax.core.copy(state.params, {})
  bad_params['log_temperature'] = np.float32(np.nan)
  state = state.replace(params=bad_params)
  devices = jax.local_devices()[:1]
  before = jax.tree.map(np.asarray, state.params)
  p_step = train_step.make_pmapped_train_step(config, devices=devices)
  batch = jax.tree.map(lambda x: x[None], _random_batch(config, 8, 50))
  new_state, metrics = p_step(flax.jax_utils.replicate(state, devices), batch)
  assert float(metrics['nonfinite'][0]) == 1.0
  assert int(new_state.nonfinite_steps[0]) == 1
  assert int(new_state.step[0]) == 1  # The step counter still advances, equal to the loop's.
  after = replication.unreplicate(new_state).params
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)


def test_a_run_writes_every_mode_to_metrics_json_and_tensorboard(data_dir, tmp_path, monkeypatch):
  """The default evaluation of a whole run (resume == uninterrupted: tests/test_fault_injection.py).

  On the CPU the loop dispatches a step only once the one before it has finished on every device: queued
  steps deadlock XLA's CPU collectives (hivlp_jax/steps_in_flight.py)."""
  config = tiny_config(data_dir)
  workdir = str(tmp_path / 'run')
  RecordingStepsInFlight.instances.clear()
  monkeypatch.setattr(steps_in_flight, 'StepsInFlight', RecordingStepsInFlight)
  results = train.train_and_evaluate(config, workdir)
  [in_flight] = RecordingStepsInFlight.instances
  assert len(in_flight.added) == 6 and in_flight.unfinished_after_wait == [0] * 6
  assert results['two_stage_dim32_k50']['t2i_p50_ms'] > 0 and 't2i_shortlist_recall' in results['two_stage_dim32_k50']
  with open(os.path.join(workdir, 'metrics.json')) as f:
    saved = json.load(f)
  modes = {mode.name for mode in evaluate.modes_from_config(config)}
  assert {f'exact_dim{d}' for d in (8, 16, 32, 64)} | {'two_stage_dim32_k50'} <= modes
  assert saved['step'] == 6 and saved['recall_unit'] == 'percent' and set(saved) == {'step', 'recall_unit'} | modes
  assert saved['exact_dim64'] == results['exact_dim64']
  assert checkpointing.Checkpoints(workdir, 2, create=False).all_steps() == [3, 6]
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(workdir))


def _vocab_size(config):
  from hivlp_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.get_tokenizer(config).vocab_size


def test_short_training_beats_chance_by_a_wide_margin(data_dir, tmp_path):
  """64 held-out test images x 5 captions: chance R@10 is 10/64 = 0.16 (t2i) and ~0.15 (i2t)."""
  config = tiny_config(data_dir)
  config.model.image.depth = config.model.text.depth = 2  # Capacity: one block reaches R@10 ~0.5 here.
  config.num_train_steps = 150
  config.optimizer.warmup_steps = 20
  config.checkpoint_every_steps = 150
  config.log_every_steps = 50
  results = train.train_and_evaluate(config, str(tmp_path / 'learn'))
  full = results['exact_dim64']
  assert full['t2i_r10'] > 50 and full['i2t_r10'] > 50, full  # Percent.
  assert results['exact_dim16']['t2i_r10'] > 40, results['exact_dim16']


def test_a_time_budget_checkpoints_and_evaluates_the_step_it_ends_at_and_a_rerun_continues(data_dir, tmp_path, caplog):
  config = tiny_config(data_dir)
  config.num_train_steps = 6
  config.train_minutes = 1e-4  # 6 ms: used up by the set-up, so training ends after its first step.
  workdir = str(tmp_path / 'run')
  with caplog.at_level('WARNING'):
    results = train.train_and_evaluate(config, workdir)
  assert 'config.train_minutes=0.0001 used up after step 1 of 6: checkpointed; evaluating it' in caplog.text
  with open(os.path.join(workdir, 'metrics.json')) as f:
    assert json.load(f)['step'] == 1
  assert results and 'exact_dim64' in results
  assert checkpointing.Checkpoints(workdir, 1, create=False).all_steps() == [1]
  config.train_minutes = 0.0
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'metrics.json')) as f:
    assert json.load(f)['step'] == 6


def test_the_warm_up_can_be_a_share_of_the_run_and_a_bad_share_is_named(data_dir):
  config = tiny_config(data_dir)
  config.num_train_steps, config.optimizer.warmup_steps, config.optimizer.warmup_fraction = 400, 7, 0.25
  schedule = train_step.learning_rate_fn(config)
  peak = config.optimizer.learning_rate
  np.testing.assert_allclose([schedule(50), schedule(100)], [peak / 2, peak], rtol=1e-6)  # 100 steps, not 7.
  config.optimizer.warmup_fraction = 1.0
  with pytest.raises(errors.InputError, match=r'optimizer.warmup_fraction=1.0 must be in \[0, 1\)'):
    config_lib.validate(config)
