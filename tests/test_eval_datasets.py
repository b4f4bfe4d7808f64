"""Several evaluation sets per run: `--mode=evaluate` on the run's own set and a Flickr30K-layout folder, and
the bad set names and locations it refuses before restoring anything."""

import os
import subprocess
import sys

import pytest

from hivlp_jax import config_lib
from hivlp_jax import errors
from hivlp_jax import evaluators
from hivlp_jax import files
from hivlp_jax import train
from hivlp_jax.data import eval_sets
from tests.conftest import tiny_config
from tests.test_real_data import _write_flickr_manual_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Recall only (speed figures are timings), 2 steps: the evaluation sets are under test.
OVERRIDES = {'eval.two_stage': (), 'eval.funnel': (), 'eval.latency_queries': 0, 'num_train_steps': 2,
             'checkpoint_every_steps': 2}


def _config(data_dir):
  config = tiny_config(data_dir)
  for name, value in OVERRIDES.items():
    *parents, key = name.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[key] = value
  return config


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
  """(workdir of a 2-step tiny run on the embedded scenes, a Flickr30K-layout folder with 6 test images)."""
  root = tmp_path_factory.mktemp('eval_sets')
  manual = root / 'flickr30k'
  _write_flickr_manual_dir(manual, ['train'] * 2 + ['test'] * 6)
  train.train_and_evaluate(_config(data_dir), str(root / 'run'))
  return root / 'run', manual


def test_evaluate_writes_one_metrics_file_per_set(data_dir, trained):
  """From the command line, two sets: the run's own file equals the training run's metrics.json."""
  workdir, manual = trained
  overrides = [f'--config.{k}={v!r}' for k, v in OVERRIDES.items()]
  completed = subprocess.run(
      [sys.executable, '-m', 'hivlp_jax.main', '--mode=evaluate', f'--workdir={workdir}',
       '--config=configs/tiny.py', f'--config.data.data_dir={data_dir}', *overrides,
       "--config.eval.datasets=('embedded_scenes', 'flickr30k')",
       f'--config.eval.locations.flickr30k.manual_dir={manual}'],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  trained_metrics = files.read_json(workdir / 'metrics.json')
  assert files.read_json(workdir / 'metrics' / 'embedded_scenes' / 'test' / 'step_2.json') == trained_metrics
  flickr = files.read_json(workdir / 'metrics' / 'flickr30k' / 'test' / 'step_2.json')
  assert sorted(flickr) == sorted(trained_metrics) and flickr['step'] == 2
  assert flickr['exact_dim64']['t2i_r10'] == 100.0  # 6 test images: every one is in a top 10.
  assert flickr['exact_dim64'] != trained_metrics['exact_dim64']
  assert 'Results at step 2 on flickr30k' in completed.stderr


@pytest.mark.parametrize('datasets, locations, error, message', [
    (('flickr',), {}, errors.InputError, r"config\.eval\.datasets\[0\]='flickr' is not a known evaluation set"),
    (('embedded_scenes', ''), {}, errors.InputError, r"config\.eval\.datasets\[1\]='' is empty"),
    (('flickr30k', 'flickr30k'), {}, errors.InputError, r"config\.eval\.datasets=.* names 'flickr30k' twice"),
    (('flickr30k',), {'manual_dir': 'MISSING'}, errors.MissingInputError,
     r"Evaluation set 'flickr30k' of config\.eval\.datasets \(read as config\.eval\.locations\.flickr30k says\): "
     r"Flickr30K needs manual files in '.*nowhere'.*"
     r"dataset_flickr30k\.json.*Download them"),
    (('coco',), {'source': 'tfds', 'data_dir': 'MISSING'}, errors.MissingInputError,
     r"'coco' of config\.eval\.datasets .*: TFDS coco_captions/2014 is not prepared in '.*nowhere' "
     r"\(config\.eval\.locations\.coco\.data_dir\) in the ArrayRecord format\. Build it once"),
])
def test_bad_evaluation_sets_are_named_before_the_restore(data_dir, trained, tmp_path, datasets, locations, error,
                                                          message):
  """The workdir holds no checkpoint: a set's error comes first, so it comes before any restore."""
  config = _config(data_dir)
  config.eval.datasets = datasets
  for key, value in locations.items():
    config.eval.locations[datasets[0]][key] = str(tmp_path / 'nowhere') if value == 'MISSING' else value
  if error is not errors.MissingInputError:
    with pytest.raises(error, match=message):
      config_lib.validate(config)
  with pytest.raises(error, match=message):
    evaluators.evaluate_workdir(config, str(tmp_path))


def test_embedded_scenes_are_refused_for_a_model_of_another_image_size(data_dir):
  config = _config(data_dir)
  config.data.name, config.model.image_size = 'flickr30k', 64
  with pytest.raises(errors.InputError, match=r'32 px images .*config\.model\.image_size=64.*config\.eval\.datasets'):
    eval_sets.dataset_config(config, 'embedded_scenes')
