"""Details of the step found in review: the temperature clamp, the filter warm-up, weight decay, config checks."""

import math
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hivlp_jax import config_lib
from hivlp_jax import momentum_towers
from hivlp_jax import optim
from hivlp_jax import settings
from hivlp_jax import train_step
from tests.conftest import tiny_config


def test_temperature_parameter_is_clamped_so_its_gradient_never_vanishes():
  """Pushed past temperature_max the parameter stops at log(max); the next gradient moves it back down."""
  config = tiny_config('unused')
  config.model.temperature_init = config.model.temperature_max = 0.1
  config.optimizer.update(warmup_steps=0, learning_rate=0.5, weight_decay=0.0)
  step_settings = settings.StepSettings.from_config(config)
  state = train_step.create_train_state(config, train_step.create_model(config, 50), jax.random.key(0))
  up = jax.tree.map(jnp.zeros_like, state.params)
  up['log_temperature'] = jnp.array(-1.0)  # Gradient descent raises the parameter.
  state = train_step.apply_gradients(state, up, step_settings)
  assert float(state.params['log_temperature']) == pytest.approx(math.log(0.1), abs=1e-7)
  # The model's temperature is exp(parameter) with no clip of its own: the gradient reaches the parameter.
  model = train_step.create_model(config, 50)
  grad = jax.grad(lambda p: model.apply({'params': p}, None, jnp.ones((1, 8), jnp.int32)).temperature)(state.params)
  assert float(grad['log_temperature']) == pytest.approx(0.1, rel=1e-5)
  down = dict(up, log_temperature=jnp.array(1.0))
  state = train_step.apply_gradients(state, down, step_settings)
  assert float(state.params['log_temperature']) < math.log(0.1) - 0.01  # Adam's momentum still damps it.


def test_filter_warmup_drops_nothing_but_accumulates_statistics():
  scores = jnp.array([[0.9, 0.8, 0.85, -0.5]])  # One device; the last pair is far below the others.
  stats = momentum_towers.init_filter_stats()

  def run(active):
    return jax.pmap(lambda s: momentum_towers.filter_pairs(s, stats, k=1.0, stats_momentum=0.9, axis_name='b',
                                                           active=active), 'b')(scores)
  keep_warm, stats_warm, dropped_warm = run(False)
  keep, stats_active, dropped = run(True)
  assert bool(np.all(keep_warm)) and float(dropped_warm[0]) == 0.0
  assert list(np.asarray(keep[0])) == [True, True, True, False] and float(dropped[0]) == 0.25
  np.testing.assert_allclose(stats_warm.mean, stats_active.mean)
  assert int(stats_warm.updates[0]) == 1


def test_embeddings_are_not_weight_decayed():
  config = tiny_config('unused')
  config.mvlm.mvm_weight = 1.0
  config.visual_tokenizer.codes_file = 'unused.npy'
  params = train_step.create_train_state(config, train_step.create_model(config, 50), jax.random.key(0)).params
  mask = optim.decay_mask(params, train_step.NO_DECAY)
  image = mask['image_tower']
  assert image['mask_token'] is False and image['cls'] is False and image['pos_embedding'] is False
  assert mask['log_temperature'] is False
  assert any(jax.tree.leaves(image))  # The matrices still are.


BAD_VALUES = [
    ('checkpoint_every_steps', 0, 'must be >= 1'), ('log_every_steps', -1, 'must be >= 1'),
    ('batch_size', 0, 'must be >= 1'), ('max_checkpoints_to_keep', 0, 'must be >= 1'),
    ('max_consecutive_nonfinite_steps', 0, 'must be >= 1'), ('optimizer.learning_rate', -1e-3, 'finite and >= 0'),
    ('optimizer.learning_rate', float('nan'), 'finite and >= 0'), ('optimizer.b2', 1.0, r'in \[0, 1\)'),
    ('num_train_steps', -5, 'must be >= 0'), ('loss.dim_weights', (1.0, float('nan'), 1.0, 1.0), 'finite'),
    ('model.temperature_init', 0.9, 'must lie in'), ('contrastive.filter_warmup_steps', -1, 'must be >= 0'),
    ('eval.batch_size', 0, 'must be >= 1'),
]


@pytest.mark.parametrize('field,value,message', BAD_VALUES)
def test_bad_config_values_are_refused_naming_the_field(field, value, message):
  config = tiny_config('unused')
  if field.startswith('contrastive.'):  # Checked only with queues.
    config.contrastive.update(queue_size=64, filter_noisy_pairs=True)
  *parents, key = field.split('.')
  node = config
  for part in parents:
    node = node[part]
  node[key] = value
  with pytest.raises(ValueError, match=rf'config\.{re.escape(field)}=.*{message}'):
    config_lib.validate(config)


def test_wrong_flag_type_is_one_line_without_traceback():
  result = subprocess.run([sys.executable, '-m', 'hivlp_jax.main', '--config=configs/tiny.py', '--workdir=unused',
                           '--config.batch_size=abc'], capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr
  assert 'batch_size' in result.stderr.strip().splitlines()[-1]


def test_a_damaged_config_record_is_named(tmp_path):
  config = tiny_config('unused')
  (tmp_path / config_lib.CONFIG_FILE).write_text('{"seed": 0,, }')
  with pytest.raises(ValueError, match=r'config\.json is not valid JSON'):
    config_lib.check_workdir_config(str(tmp_path), config)


def test_stop_after_step_below_1_is_refused():
  result = subprocess.run([sys.executable, '-m', 'hivlp_jax.main', '--config=configs/tiny.py', '--workdir=unused',
                           '--stop_after_step=-1'], capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode != 0 and '--stop_after_step=-1 must be >= 1' in result.stderr
