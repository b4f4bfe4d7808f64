"""Fault injection on the tiny config: signals, damaged checkpoints, non-finite updates, a second run.

Each fault is real (a real signal, real damaged files on disk, a real NaN learning rate); the reference is an
uninterrupted run of the same config.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from hivlp_jax import checkpointing
from hivlp_jax import errors
from hivlp_jax import evaluators
from hivlp_jax import files
from hivlp_jax import train
from hivlp_jax import train_step
from hivlp_jax import workdir_lock
from hivlp_jax.data import pipeline
from tests.conftest import tiny_config
from tests.conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data_dir):
  config = tiny_config(data_dir)
  config.eval.two_stage, config.eval.funnel, config.eval.latency_queries = (), (), 0  # Recall only.
  config.model.image.depth = config.model.text.depth = 1  # Compiles faster; the faults are under test.
  return config


def _params(workdir, step=None):
  checkpoints = checkpointing.Checkpoints(workdir, 2, create=False)
  step = max(checkpoints.all_steps()) if step is None else step
  restored = checkpoints.restore(step)
  return restored['params'], int(restored['step'])


def _assert_same_params(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def _initial_state(config):
  vocab_size = pipeline.get_tokenizer(config).vocab_size
  return train_step.create_train_state(config, train_step.create_model(config, vocab_size), jax.random.key(0))


@pytest.fixture(scope='module')
def straight_run(data_dir, tmp_path_factory):
  """The uninterrupted 6-step run (checkpoints at 3 and 6) and its results."""
  workdir = str(tmp_path_factory.mktemp('straight'))
  return workdir, train.train_and_evaluate(_config(data_dir), workdir)


def _signal_after(monkeypatch, calls: int, signum=signal.SIGTERM):
  """Makes the train step send `signum` to this process right after its `calls`-th call."""
  real = train_step.make_pmapped_train_step

  def make(config, devices=None):
    step, count = real(config, devices), [0]
    def signalling_step(state, batch):
      out = step(state, batch)
      count[0] += 1
      if count[0] == calls:
        os.kill(os.getpid(), signum)
      return out
    return signalling_step
  monkeypatch.setattr(train_step, 'make_pmapped_train_step', make)


def test_sigterm_checkpoints_the_current_step_and_resume_equals_uninterrupted(data_dir, tmp_path, monkeypatch,
                                                                             straight_run):
  straight, results = straight_run
  workdir = str(tmp_path / 'preempted')
  _signal_after(monkeypatch, 2)
  with pytest.raises(train.Preempted, match='SIGTERM: checkpointed step 2'):
    train.train_and_evaluate(_config(data_dir), workdir)
  assert checkpointing.Checkpoints(workdir, 2).all_steps() == [2]  # Not a checkpoint step: saved for the signal.
  assert (files.path(workdir) / checkpointing.CHECKSUMS / '2.json').exists()  # The save committed.
  assert not (files.path(workdir) / workdir_lock.LOCK_FILE).exists()
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # The handlers are restored.
  monkeypatch.undo()
  assert train.train_and_evaluate(_config(data_dir), workdir) == results
  _assert_same_params(_params(straight)[0], _params(workdir)[0])


def test_sigterm_subprocess_exits_with_the_preempted_status_within_30_s(data_dir, tmp_path):
  workdir = tmp_path / 'run'
  command = [sys.executable, '-m', 'hivlp_jax.main', '--config=configs/tiny.py', f'--workdir={workdir}',
             f'--config.data.data_dir={data_dir}', '--config.num_train_steps=100000',
             '--config.checkpoint_every_steps=100000', '--config.log_every_steps=1']
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  process = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
  log = []
  for line in process.stderr:  # Wait until it trains (logged steps), then preempt it.
    log.append(line)
    if 'loss' in line and '[3]' in line:
      break
  else:
    pytest.fail('The run ended before training:\n' + ''.join(log[-20:]))
  start = time.monotonic()
  process.send_signal(signal.SIGTERM)
  _, rest = process.communicate(timeout=60)
  elapsed = time.monotonic() - start
  assert process.returncode == train.EXIT_PREEMPTED, rest[-3000:]
  assert elapsed < 30
  assert 'checkpointed; run again to resume' in rest
  steps = checkpointing.Checkpoints(str(workdir), 2).all_steps()
  assert len(steps) == 1 and steps[0] >= 3


def test_damaged_newest_checkpoints_fall_back_to_the_intact_one(data_dir, tmp_path, straight_run):
  """An empty newer step folder, a partial step 6 and a killed save's tmp folder: step 3 restores, and the run
  then saves steps 6 again and ends equal to the uninterrupted run."""
  straight, results = straight_run
  workdir = tmp_path / 'run'
  config = _config(data_dir)
  shutil.copytree(straight, workdir)
  checkpoints = workdir / 'checkpoints'
  (checkpoints / '9').mkdir()  # Empty.
  data_files = sorted(p for p in (checkpoints / '6').rglob('*') if p.is_file() and p.stat().st_size > 100)
  data_files[0].unlink()  # Partial.
  (checkpoints / '8.orbax-checkpoint-tmp-1').mkdir()  # What a SIGKILL during an async save leaves.
  state = _initial_state(config)
  restored = checkpointing.Checkpoints(str(workdir), 2).restore_latest(state)
  assert int(restored.step) == 3
  assert sorted(os.listdir(workdir / checkpointing.QUARANTINE))[0].startswith('6-')  # Moved aside, not deleted.
  assert train.train_and_evaluate(config, str(workdir)) == results
  _assert_same_params(_params(straight)[0], _params(str(workdir))[0])


def test_a_flipped_byte_is_detected_and_named(data_dir, tmp_path, caplog, straight_run):
  workdir = tmp_path / 'run'
  config = _config(data_dir)
  shutil.copytree(straight_run[0], workdir)
  victim = max((p for p in (workdir / 'checkpoints' / '6').rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  data = bytearray(victim.read_bytes())
  data[len(data) // 2] ^= 0x01
  victim.write_bytes(bytes(data))
  with pytest.raises(IOError, match=f'{victim.name} differs from its checksum'):
    checkpointing.Checkpoints(str(workdir), 2).verify(6)
  state = _initial_state(config)
  caplog.set_level('ERROR')
  # The params-only restore (query tool, evaluation) falls back to step 3 and leaves the folders as they are.
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params)
  params, step = checkpointing.restore_params(str(workdir), abstract)
  assert step == 3 and victim.name in caplog.text
  _assert_same_params(params, _params(str(workdir), 3)[0])
  assert int(checkpointing.Checkpoints(str(workdir), 2).restore_latest(state).step) == 3


def test_nan_learning_rate_stops_without_checkpointing_a_nonfinite_state(data_dir, tmp_path, monkeypatch):
  config = _config(data_dir)
  config.max_consecutive_nonfinite_steps = 2
  config.checkpoint_every_steps = 1
  config.log_every_steps = 1
  real = train_step.learning_rate_fn
  monkeypatch.setattr(train_step, 'learning_rate_fn', lambda c: lambda step: real(c)(step) * np.nan)
  workdir = str(tmp_path / 'run')
  with pytest.raises(FloatingPointError, match=r'not finite for 2 steps in a row up to step 2.*nothing non-finite '
                                               'was checkpointed'):
    train.train_and_evaluate(config, workdir)
  initial = _initial_state(config).params
  steps = checkpointing.Checkpoints(workdir, 2).all_steps()
  assert steps == [1]  # Saved before the stop; step 2 stops the run at its log line, before its save.
  for step in steps:
    params, saved_step = _params(workdir, step)
    assert saved_step == step  # The step counter advanced with the loop's.
    assert checkpointing.all_finite(params)
    _assert_same_params(params, initial)  # Nothing was applied.


def test_refuses_to_checkpoint_a_nonfinite_state(tmp_path):
  checkpoints = checkpointing.Checkpoints(str(tmp_path), 2)
  with pytest.raises(FloatingPointError, match='Refusing to checkpoint step 4'):
    checkpoints.save(4, {'w': np.array([1.0, np.nan], np.float32)})
  checkpoints.close()
  assert checkpoints.all_steps() == []


def test_a_committed_save_is_recorded_before_the_next_one(tmp_path):
  """A run killed between two saves must leave its newest checkpoint verifiable: the log step records it."""
  checkpoints = checkpointing.Checkpoints(str(tmp_path), 2)
  checkpoints.save(4, {'w': np.arange(3, dtype=np.float32)})
  record = tmp_path / checkpointing.CHECKSUMS / '4.json'
  deadline = time.monotonic() + 60
  while checkpoints.manager.is_saving_in_progress() and time.monotonic() < deadline:
    time.sleep(0.05)
  assert not record.exists()  # Nothing has recorded it yet ...
  checkpoints.record_finished()
  assert set(files.read_json(record)) == set(checkpointing.step_checksums(checkpoints.directory / '4'))
  checkpoints.verify(4)  # ... and now it is checked at restore.
  checkpoints.close()


def test_resume_after_skipped_steps_equals_uninterrupted(data_dir, tmp_path, monkeypatch):
  """Step 2's update is NaN (skipped); stopped at 3 and resumed, the run equals a straight one."""
  config = _config(data_dir)
  real = train_step.learning_rate_fn
  monkeypatch.setattr(train_step, 'learning_rate_fn',
                      lambda c: lambda step: jax.numpy.where(step == 1, np.nan, real(c)(step)))
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  train.train_and_evaluate(config, straight)
  train.train_and_evaluate(config, resumed, stop_after_step=3)
  assert _params(resumed, 3)[1] == 3  # The checkpoint of step 3 holds 3 steps, one of them skipped.
  train.train_and_evaluate(config, resumed)
  _assert_same_params(_params(straight)[0], _params(resumed)[0])


def test_a_second_run_in_the_same_workdir_is_refused(tmp_path):
  with workdir_lock.WorkdirLock(str(tmp_path)):
    with pytest.raises(RuntimeError, match=f'process {os.getpid()} on host'):
      with workdir_lock.WorkdirLock(str(tmp_path)):
        pass
  assert not (tmp_path / workdir_lock.LOCK_FILE).exists()
  # A lock left by a killed run (its pid is gone) is stale and taken over.
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  import socket  # pylint: disable=g-import-not-at-top
  files.write_json(tmp_path / workdir_lock.LOCK_FILE, {'host': socket.gethostname(), 'pid': dead.pid})
  with workdir_lock.WorkdirLock(str(tmp_path)) as lock:
    assert lock.held


def test_an_unreadable_checksum_record_does_not_discard_its_checkpoint(data_dir, tmp_path, straight_run):
  workdir = tmp_path / 'run'
  shutil.copytree(straight_run[0], workdir)
  (workdir / checkpointing.CHECKSUMS / '6.json').write_text('{garbage')
  restored = checkpointing.Checkpoints(str(workdir), 2).restore_latest(_initial_state(_config(data_dir)))
  assert int(restored.step) == 6
  assert not (workdir / checkpointing.QUARANTINE).exists()


def test_evaluate_workdir_reproduces_the_training_metrics_without_training(data_dir, tmp_path, straight_run):
  """Only the parameters of a checkpoint are restored and evaluated; the metrics go under WORKDIR/metrics/,
  and a missing step or checkpoint is named."""
  straight, results = straight_run
  workdir = tmp_path / 'run'
  shutil.copytree(straight, workdir)
  trained = files.read_json(workdir / 'metrics.json')
  assert evaluators.evaluate_workdir(_config(data_dir), str(workdir)) == {'embedded_scenes': results}
  assert files.read_json(workdir / 'metrics' / 'embedded_scenes' / 'test' / 'step_6.json') == trained
  assert files.read_json(workdir / 'metrics.json') == trained  # The training run's own file is left alone.
  assert checkpointing.Checkpoints(str(workdir), 2).all_steps() == [3, 6]  # Nothing trained or saved.
  # From the command line, with the run's own config (WORKDIR/config.json): the same metrics as in-process.
  completed = subprocess.run([sys.executable, '-m', 'hivlp_jax.main', '--mode=evaluate', f'--workdir={workdir}',
                              '--step=3'], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  from_cli = files.read_json(workdir / 'metrics' / 'embedded_scenes' / 'test' / 'step_3.json')
  older = evaluators.evaluate_workdir(_config(data_dir), str(workdir), step=3)['embedded_scenes']
  assert from_cli == {'step': 3, 'recall_unit': 'percent', **older} and older != results
  with pytest.raises(errors.InputError, match=r'--step=5: .*checkpoints holds steps \[3, 6\]'):
    evaluators.evaluate_workdir(_config(data_dir), str(workdir), step=5)
  (tmp_path / 'untrained').mkdir()
  with pytest.raises(errors.MissingInputError, match=r'No checkpoint in .*untrained.*: train there first'):
    evaluators.evaluate_workdir(_config(data_dir), str(tmp_path / 'untrained'))
  with pytest.raises(errors.MissingInputError, match=r'--workdir=.*missing does not exist'):
    evaluators.evaluate_workdir(_config(data_dir), str(tmp_path / 'missing'))
