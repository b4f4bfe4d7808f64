"""Test set-up: 4 simulated CPU devices (set before jax is imported) and a tiny generated data set."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import pytest  # pylint: disable=g-import-not-at-top

from configs import tiny  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A data dir holding the 'tiny' embedded data set (generated once per session)."""
  from hivlp_jax.data import embedded_scenes  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp('data'))
  embedded_scenes.EmbeddedScenes(data_dir=path, config='tiny').download_and_prepare()
  return path


def tiny_config(data_dir: str):
  """configs/tiny.py with its data in the session's data dir."""
  config = tiny.get_config()
  config.data.data_dir = data_dir
  return config
