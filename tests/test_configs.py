"""Every config parses and runs one step; bad configs fail at start-up with a message naming the field."""

import glob
import json
import os
import subprocess
import sys

from absl import flags
import flax
import jax
from ml_collections import config_flags
import numpy as np
import pytest

from hivlp_jax import config_lib
from hivlp_jax import errors
from hivlp_jax import train_step
from tests.conftest import tiny_config

CONFIGS = sorted(p for p in glob.glob('configs/*.py') if not p.endswith('__init__.py'))


def _parse(*argv):
  flag_values = flags.FlagValues()
  argv = ['prog', *argv]
  # sys_argv: config_flags reads the config path first, so that --config.x overrides are known flags.
  config_flags.DEFINE_config_file('config', flag_values=flag_values, lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def test_configs_are_found():
  assert {'configs/default.py', 'configs/base_b16.py'} <= set(CONFIGS)


STEPPED_SIGNATURES = set()  # The step configurations that one of the configs has already run.


@pytest.mark.parametrize('path', CONFIGS)
def test_config_parses_and_runs_one_step_in_smoke_mode(path, data_dir):
  """Smoke mode: the config's widths, patch size, dims and dtype, with one block per tower and a tiny batch.

  Configs that differ from an earlier one only in data and schedule (e.g. flickr30k.py and base_b16.py)
  are parsed and validated, and their identical step is not compiled again.
  """
  config = _parse(f'--config={path}', '--config.num_train_steps=1')
  config_lib.validate(config)
  signature = str({k: v for k, v in config_lib.flatten(config).items()
                   if k.split('.')[0] in ('model', 'loss', 'contrastive', 'mvlm')})
  if signature in STEPPED_SIGNATURES:
    return
  STEPPED_SIGNATURES.add(signature)
  config.model.image.depth = config.model.text.depth = 1
  config.batch_size = jax.local_device_count()
  model = train_step.create_model(config, vocab_size=64)
  state = flax.jax_utils.replicate(train_step.create_train_state(config, model, jax.random.key(0)))
  rng = np.random.default_rng(0)
  size, max_len = 32, config.model.text.max_len  # Stored images are 32 px; the model resizes them.
  batch = {'image': rng.integers(0, 256, (jax.local_device_count(), 1, size, size, 3), dtype=np.uint8),
           'text': rng.integers(5, 64, (jax.local_device_count(), 1, max_len), dtype=np.int32),
           'image_id': np.arange(jax.local_device_count(), dtype=np.int32).reshape(-1, 1)}
  state, metrics = train_step.make_pmapped_train_step(config)(state, batch)
  assert np.isfinite(float(metrics['loss'][0]))
  assert int(state.step[0]) == 1


@pytest.mark.parametrize('args, last_line', [
    (['--config.model.nestd_dims=(8,16)'], "Unknown config key 'config.model.nestd_dims' on the command line. Did "
     "you mean 'nested_dims'? The config file lists the keys."),
    (['--config.optimizer.learning_rate=-1'], 'Error: config.optimizer.learning_rate=-1.0 must be finite and >= 0.'),
    (['--confg.batch_size=8'], 'Unknown flag --confg.batch_size; --helpfull lists the flags.'),
    (['--config=configs/tinny.py'], "The config file 'configs/tinny.py' could not be loaded: "),
    (['--workdir=README.md'], "Error: --workdir='README.md' is a file, not a folder: pass a folder (new or a run's)."),
])
def test_command_line_errors_are_one_line_naming_the_input(args, last_line, tmp_path):
  argv = ['--config=configs/tiny.py', f'--workdir={tmp_path / "run"}', *args]
  result = subprocess.run([sys.executable, '-m', 'hivlp_jax.main', *argv], capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(last_line)
  assert not os.path.exists(tmp_path / 'run')  # Refused before the run touches its workdir.


def test_unknown_override_keys():
  assert config_lib.unknown_override_keys(config_lib.load_config_file('configs/default.py'),
                                          ['--config.model.image.width=3', '--config.nope.x=1']) == ['config.nope.x']


@pytest.mark.parametrize('override, message', [
    ('--config.model.dtype=float8', "model.dtype='float8' is not one of"),
    ('--config.data.builder_config=huge', "data.builder_config='huge' is not one of the embedded_scenes configs"),
    ('--config.model.image.init_checkpoint=nowhere/ViT.npz', "init_checkpoint='nowhere/ViT.npz' does not exist"),
    ('--config.model.temperature_min=0.0', r'model.temperature_min=0.0 must be > 0'),
])
def test_bad_model_and_data_fields_are_named(override, message):
  with pytest.raises(errors.InputError, match=message):
    config_lib.validate(_parse('--config=configs/tiny.py', override))


def test_nested_dims_not_increasing_are_named():
  config = _parse('--config=configs/default.py', '--config.model.nested_dims=(64,32)',
                  '--config.loss.dim_weights=(1.,1.)')
  with pytest.raises(ValueError, match=r'nested_dims=\(64, 32\) must be positive and strictly increasing'):
    config_lib.validate(config)


def test_nested_dim_larger_than_head_is_named():
  config = _parse('--config=configs/default.py', '--config.model.nested_dims=(32,512)',
                  '--config.loss.dim_weights=(1.,1.)')
  with pytest.raises(ValueError, match='larger than the head'):
    config_lib.validate(config)


def test_dim_weights_must_match_nested_dims():
  config = _parse('--config=configs/default.py', '--config.loss.dim_weights=(1.,1.)')
  with pytest.raises(ValueError, match='dim_weights has 2 entries'):
    config_lib.validate(config)


def test_unknown_two_stage_backend_is_named():
  config = _parse('--config=configs/default.py', '--config.eval.two_stage_backend=faiss')
  with pytest.raises(ValueError, match=r"two_stage_backend='faiss' is not one of \('auto', 'rerank', 'truncate'\)"):
    config_lib.validate(config)


def test_batch_not_divisible_by_device_count_is_named():
  assert jax.device_count() == 4
  config = _parse('--config=configs/default.py', '--config.batch_size=30')
  with pytest.raises(ValueError, match='batch_size=30 is not divisible by the 4 devices'):
    config_lib.validate(config)


def test_workdir_of_another_config_is_refused(tmp_path, data_dir):
  config = tiny_config(data_dir)
  config_lib.check_workdir_config(str(tmp_path), config)
  config.num_train_steps = 99  # Allowed: extends the run.
  config_lib.check_workdir_config(str(tmp_path), config)
  config.model.image.width = 96
  with pytest.raises(ValueError, match=r'another config \(model.image.width: 64 -> 96\)'):
    config_lib.check_workdir_config(str(tmp_path), config)
  assert os.path.exists(tmp_path / config_lib.CONFIG_FILE)


def test_workdir_recorded_before_a_field_existed_resumes(tmp_path, data_dir):
  config = tiny_config(data_dir)
  config_lib.check_workdir_config(str(tmp_path), config)
  path = tmp_path / config_lib.CONFIG_FILE
  recorded = json.loads(path.read_text())
  del recorded['mvlm.mlm_weight']  # As if the run had started before the field was added.
  path.write_text(json.dumps(recorded))
  config_lib.check_workdir_config(str(tmp_path), config)  # Accepted (with a warning), and recorded.
  assert 'mvlm.mlm_weight' in json.loads(path.read_text())
