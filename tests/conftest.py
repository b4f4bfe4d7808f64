"""Test set-up: 4 simulated CPU devices (set before jax is imported) and a tiny generated data set."""

import builtins
import contextlib
import os
import traceback
import unittest.mock

# Tests compile many small programs and run them for a few steps: XLA's compile dominates, and LLVM's
# optimisation level 0 compiles the train step in 0.6x the time (its steps run ~2.5x slower; measured on
# configs/tiny.py). Programs and results are the same; production runs keep XLA's default.
FAST_COMPILE = '--xla_backend_optimization_level=0'


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test (or its subprocess) on `devices` simulated CPU devices."""
  return f'--xla_force_host_platform_device_count={devices} {FAST_COMPILE}'


os.environ.setdefault('XLA_FLAGS', xla_flags(4))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
# XLA's compile of the train step dominates the suite's time, and many tests compile the same programs (each
# run builds its own pmap): the persistent cache compiles each once, for subprocesses too (they inherit it).
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), '.jax_cache'))

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


# Libraries that serve object stores themselves: a workdir file they open is fine (orbax, TensorFlow's gfile
# behind clu's writers, and etils.epath, the path layer hivlp_jax.files wraps).
_PATH_LAYERS = ('/etils/epath/', '/orbax/', '/tensorflow/', '/tensorstore/')


@contextlib.contextmanager
def workdir_io_guard(root: str):
  """Fails when a file below `root` is opened, replaced or renamed by a call that bypasses the path layer
  (a plain open(), np.save(path), os.replace in our code or a library): such a call breaks on gs:// workdirs.

  epath offers no object store that a test can create, so this is the check that every workdir file goes
  through hivlp_jax.files (etils.epath)."""
  root = os.path.realpath(root)
  real = {'open': builtins.open, 'replace': os.replace, 'rename': os.rename}
  bypasses = []

  def check(target):
    if isinstance(target, int):
      return
    if not os.path.realpath(os.fspath(target)).startswith(root):
      return
    stack = traceback.extract_stack()[:-2]
    if not any(layer in frame.filename for frame in stack for layer in _PATH_LAYERS):
      bypasses.append(f'{target}\n' + ''.join(traceback.format_list(stack[-4:])))

  def guarded(name):
    def call(target, *args, **kwargs):
      check(target)
      if name != 'open':
        check(args[0])
      return real[name](target, *args, **kwargs)
    return call

  with unittest.mock.patch('builtins.open', guarded('open')), \
       unittest.mock.patch('os.replace', guarded('replace')), unittest.mock.patch('os.rename', guarded('rename')):
    yield
  assert not bypasses, f'{len(bypasses)} workdir files bypassed hivlp_jax.files, e.g. {bypasses[0]}'
