"""Starting a run from another run's checkpoint (config.init): every fitting array copied, position
embeddings fitted, the rest reported; a run started with learning rate 0 evaluates exactly like its source."""

import json
import os

import jax
import numpy as np
import pytest

from hivlp_jax import checkpointing
from hivlp_jax import errors
from hivlp_jax import init_from_run
from hivlp_jax import train
from hivlp_jax import train_step
from hivlp_jax.data import pipeline
from hivlp_jax.models import encoders
from tests.conftest import tiny_config


def test_merge_copies_fits_and_reports():
  normal = lambda size: np.random.default_rng(sum(size)).normal(size=size).astype(np.float32)
  old = {'image_tower': {'pos_embedding': normal((1, 1 + 4 * 4, 8)), 'encoder': {
             'block0': {'w': normal((8, 8))}, 'block1': {'w': normal((8, 8))}}},
         'text_tower': {'pos_embedding': normal((1, 6, 8))},
         'image_head': {'proj': {'kernel': normal((8, 16))}},
         'gone': normal((3,))}
  new = {'image_tower': {'pos_embedding': np.zeros((1, 1 + 2 * 2, 8)), 'encoder': encoders.stack_layers(
             {'block0': {'w': np.zeros((8, 8))}, 'block1': {'w': np.zeros((8, 8))}})},  # Scanned layout.
         'text_tower': {'pos_embedding': np.full((1, 9, 8), 7.0)},
         'image_head': {'proj': {'kernel': np.ones((8, 32))}},  # Another head size.
         'fresh': np.ones((2,))}
  merged, report = init_from_run.merge(old, new)
  blocks = encoders.unstack_layers(merged['image_tower']['encoder'])
  np.testing.assert_array_equal(blocks['block1']['w'], old['image_tower']['encoder']['block1']['w'])
  assert merged['image_tower']['pos_embedding'].shape == (1, 5, 8)  # The 4x4 grid resized to 2x2, [CLS] kept.
  np.testing.assert_array_equal(merged['image_tower']['pos_embedding'][:, 0], old['image_tower']['pos_embedding'][:, 0])
  text = merged['text_tower']['pos_embedding']  # 6 old positions, then the new initial rows.
  np.testing.assert_array_equal(text[:, :6], old['text_tower']['pos_embedding'])
  assert (text[:, 6:] == 7.0).all()
  np.testing.assert_array_equal(merged['image_head']['proj']['kernel'], np.ones((8, 32)))
  assert 'image_head/proj/kernel (saved (8, 16), now (8, 32))' in report.left_new and 'fresh' in report.left_new
  assert report.unused == ['gone'] and len(report.reshaped) == 2


@pytest.fixture(scope='module')
def source_run(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('source'))
  config = tiny_config(data_dir)
  config.num_train_steps = 120
  config.optimizer.warmup_steps = 20
  config.checkpoint_every_steps = 120
  train.train_and_evaluate(config, workdir)
  return workdir


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.json')) as f:
    return json.load(f)


def test_a_run_started_from_another_with_learning_rate_0_evaluates_like_it(source_run, data_dir, tmp_path):
  config = tiny_config(data_dir)
  config.init.workdir = source_run
  config.num_train_steps = 1
  config.optimizer.learning_rate = 0.0
  tokenizer = pipeline.get_tokenizer(config)
  model = train_step.create_model(config, tokenizer.vocab_size)
  state = train_step.create_train_state(config, model, jax.random.key(1))  # Another seed than the source's.
  saved, step = checkpointing.restore_params(source_run)
  assert step == 120
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), saved)

  workdir = str(tmp_path / 'fine_tune')
  train.train_and_evaluate(config, workdir)
  source, started = _metrics(source_run), _metrics(workdir)
  for mode in [m for m in source if m.startswith('exact_dim')]:
    assert started[mode]['rsum'] == source[mode]['rsum'], mode
  scratch = tiny_config(data_dir)
  scratch.num_train_steps, scratch.optimizer.learning_rate = 1, 0.0
  train.train_and_evaluate(scratch, str(tmp_path / 'scratch'))
  assert _metrics(str(tmp_path / 'scratch'))['exact_dim64']['rsum'] < 0.6 * source['exact_dim64']['rsum']


def test_a_longer_text_and_a_missing_run_or_vocabulary_are_handled(source_run, data_dir, tmp_path, caplog):
  config = tiny_config(data_dir)
  config.init.workdir = source_run
  config.model.text.max_len += 8  # Positions extended, the rest loaded.
  model = train_step.create_model(config, pipeline.get_tokenizer(config).vocab_size)
  params, _, report = init_from_run.load(config, train_step.init_params(config, model, jax.random.key(0)))
  assert report.reshaped == [f'text_tower/pos_embedding (1, {config.model.text.max_len - 8}, 64) -> '
                             f'(1, {config.model.text.max_len}, 64)']
  assert not [name for name in report.left_new if '(saved' in name]
  assert params['text_tower']['pos_embedding'].shape[1] == config.model.text.max_len

  config.init.workdir = str(tmp_path / 'nothing')
  with pytest.raises(errors.MissingInputError, match='config.init.workdir=.*nothing does not exist'):
    init_from_run.load(config, params)
  os.makedirs(tmp_path / 'empty')
  config.init.workdir = str(tmp_path / 'empty')
  with pytest.raises(errors.MissingInputError, match=r'config.init.workdir=.*empty: No checkpoint in'):
    init_from_run.load(config, params)
  config.init.workdir, config.init.step = source_run, 7
  with pytest.raises(errors.InputError, match=r'config.init.step=7: .* holds steps \[120\]'):
    init_from_run.load(config, params)
  config.init.step = 0
  config.data.vocab_size = 150  # Another trained vocabulary: its token ids would mean other words.
  pipeline.get_tokenizer(config)
  with pytest.raises(errors.InputError, match=r'was trained with the vocabulary .*vocab\d+\.txt, this run uses'):
    init_from_run.load(config, params)


def test_parts_copy_only_their_groups_and_need_no_common_vocabulary(source_run, data_dir):
  config = tiny_config(data_dir)
  config.init.workdir = source_run
  config.data.vocab_size = 150  # Another vocabulary than the source's: fine while the text tower stays new.
  model = train_step.create_model(config, pipeline.get_tokenizer(config).vocab_size)
  fresh = jax.device_get(train_step.init_params(config, model, jax.random.key(0)))
  config.init.parts = ('image_tower', 'image_head')
  params, _, report = init_from_run.load(config, fresh)
  saved, _ = checkpointing.restore_params(source_run)
  for part in config.init.parts:
    jax.tree.map(np.testing.assert_array_equal, params[part], saved[part])
  jax.tree.map(np.testing.assert_array_equal, params['text_tower'], fresh['text_tower'])
  assert report.loaded and all(name.split('/')[0] in config.init.parts for name in report.loaded)
  assert not np.array_equal(saved['image_tower']['pos_embedding'], fresh['image_tower']['pos_embedding'])

  config.init.parts = ('image_tower', 'vision')
  with pytest.raises(errors.InputError, match=r"config.init.parts=.*\['vision'\] are not parameter groups"):
    init_from_run.load(config, fresh)
