"""Test set-up: 4 simulated CPU devices (set before jax is imported) and a tiny generated data set."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import pytest  # pylint: disable=g-import-not-at-top

from configs import default as default_config  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A data dir holding the 'tiny' embedded data set (generated once per session)."""
  from hivlp_jax.data import embedded_scenes  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp('data'))
  embedded_scenes.EmbeddedScenes(data_dir=path, config='tiny').download_and_prepare()
  return path


def tiny_config(data_dir: str):
  """The default config shrunk to a model and data set that train in seconds on CPU."""
  config = default_config.get_config()
  config.data.data_dir = data_dir
  config.data.builder_config = 'tiny'
  config.model.embed_dim = 64
  config.model.nested_dims = (8, 16, 32, 64)
  config.loss.dim_weights = (1.0, 1.0, 1.0, 1.0)
  config.model.image.update(dict(width=64, depth=2, num_heads=2, mlp_dim=128))
  config.model.text.update(dict(width=64, depth=2, num_heads=2, mlp_dim=128))
  config.batch_size = 32
  config.num_train_steps = 6
  config.optimizer.warmup_steps = 2
  config.log_every_steps = 2
  config.checkpoint_every_steps = 3
  config.eval.batch_size = 64
  return config
