"""Checkpoints of both trainers: orbax saves with checksums, restore with fallback, the recorded config.

Layout in a workdir: `checkpoints/<step>/` (orbax: `default/` the train state; `data/` a streamed run's data
order, grain's per-process JSON), `checkpoint_checksums/<step>.json` (sha256 of every file
of that step, written once the async save has committed), `checkpoints_quarantine/` (step folders that failed
to restore, moved aside rather than deleted) and `config.json` (the run's config); `run.lock` is workdir_lock.py's.
"""

import hashlib
import time
from typing import Any, Callable, Optional

from absl import logging
import grain
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from hivlp_jax import errors
from hivlp_jax import files

CHECKPOINTS = 'checkpoints'
STATE_ITEM = 'default'
DATA_ITEM = 'data'
CHECKSUMS = 'checkpoint_checksums'
QUARANTINE = 'checkpoints_quarantine'


def all_finite(tree) -> bool:
  """True when every floating-point leaf of `tree` (host or device arrays) is finite."""
  for leaf in jax.tree.leaves(tree):
    # A global array of several processes (the queues) is checked shard by shard: each process its own.
    arrays = ([s.data for s in leaf.addressable_shards] if isinstance(leaf, jax.Array) else [leaf])
    for array in map(np.asarray, arrays):
      if np.issubdtype(array.dtype, np.inexact) and not np.all(np.isfinite(array)):
        return False
  return True


def step_checksums(step_dir: files.Path) -> dict[str, str]:
  """{relative file path: sha256} of every file under a step folder."""
  sums = {}
  # walk, not rglob: epath refuses recursive globs (they would be thousands of requests on a bucket).
  paths = sorted(root / name for root, _, names in step_dir.walk() for name in names)
  for path in paths:
    digest = hashlib.sha256()
    with path.open('rb') as f:
      for block in iter(lambda: f.read(1 << 24), b''):  # pylint: disable=cell-var-from-loop
        digest.update(block)
    sums[str(path.relative_to(step_dir))] = digest.hexdigest()
  return sums


class Checkpoints:
  """Async orbax checkpoints in WORKDIR/checkpoints, verified by checksums at restore.

  `save` refuses a non-finite state (it would be a broken "last good" checkpoint). `restore_latest` tries
  the steps newest first, each with a fresh manager (a failed attempt leaves a manager unusable for the
  next), checks the checksums, and moves a step that fails aside to WORKDIR/checkpoints_quarantine.
  """

  def __init__(self, workdir: str, max_to_keep: int, create: bool = True):
    self.workdir = files.absolute(workdir)
    self.directory = self.workdir / CHECKPOINTS
    self._options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                                 enable_async_checkpointing=True)
    self.manager = self._new_manager()
    self._unrecorded: list[int] = []

  def _new_manager(self) -> ocp.CheckpointManager:
    # Named items: a step's train state, and with streamed data the data state (a run of in-memory data, or one
    # saved before the data state moved into the checkpoint, has only the first).
    return ocp.CheckpointManager(self.directory, options=self._options, item_handlers={
        STATE_ITEM: ocp.StandardCheckpointHandler(), DATA_ITEM: grain.checkpoint.CheckpointHandler()})

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_state: Optional[dict] = None) -> None:
    """Starts an async save of the host `state` (see replication.unreplicate_state) as `step`, with this
    process's `data_state` (a streamed run's `TrainStream.get_state()`) when given."""
    if not all_finite(state):
      raise FloatingPointError(f'Refusing to checkpoint step {step}: the state holds non-finite values. The '
                               f'checkpoints in {self.directory} (steps {self.all_steps()}) are unchanged.')
    self._record_checksums()
    items = {STATE_ITEM: ocp.args.StandardSave(state)}
    if data_state is not None:
      items[DATA_ITEM] = grain.checkpoint.CheckpointSave(_DataState(data_state))
    self.manager.save(step, args=ocp.args.Composite(**items))
    self._unrecorded.append(step)

  def data_state(self, step: int) -> Optional[dict]:
    """This process's data state saved with `step`, or None when the step has none (the run was not streamed)."""
    directory = self.directory / str(step) / DATA_ITEM
    if not directory.exists():
      return None
    try:
      return grain.checkpoint.CheckpointHandler().restore(directory, args=grain.checkpoint.CheckpointRestore(
          _DataState())).state
    except (ValueError, OSError) as e:  # Another process count, or a damaged file the checksums did not cover.
      raise errors.RunStateError(f'The data order saved in {directory} cannot be read ({e}). Resume with the '
                                 'process count that saved it, or start a new --workdir.') from None

  def record_finished(self) -> None:
    """Records the checksums of saves that have committed, without waiting for one in flight, so that a run
    killed between two saves leaves its newest checkpoint verifiable. One process only: with several, the
    record waits for the next save (each process may see its own save finish at another time)."""
    if self._unrecorded and jax.process_count() == 1 and not self.manager.is_saving_in_progress():
      self._record_checksums()

  def wait(self) -> None:
    """Blocks until every save has committed, and records its checksums."""
    self._record_checksums()

  def close(self) -> None:
    self.wait()
    self.manager.close()

  def _record_checksums(self) -> None:
    self.manager.wait_until_finished()
    if jax.process_index() == 0:
      kept = set(self.all_steps())
      for step in self._unrecorded:
        if step in kept:
          files.write_json(self.workdir / CHECKSUMS / f'{step}.json', step_checksums(self.directory / str(step)))
      checksums_dir = self.workdir / CHECKSUMS
      if checksums_dir.exists():  # Steps orbax has deleted (max_to_keep) lose their record too.
        for record in checksums_dir.glob('*.json'):
          if record.stem.isdigit() and int(record.stem) not in kept:
            record.unlink()
    self._unrecorded = []

  def verify(self, step: int) -> None:
    """Raises IOError naming the first file of `step` whose checksum differs (no record: not checked)."""
    record = self.workdir / CHECKSUMS / f'{step}.json'
    if not record.exists():
      logging.warning('Checkpoint of step %d has no checksum record (its save did not finish recording); '
                      'restoring it unverified.', step)
      return
    try:
      expected = files.read_json(record)
    except ValueError:  # The record is damaged, not the checkpoint: do not discard a step for it.
      logging.warning('The checksum record %s is unreadable; restoring step %d unverified.', record, step)
      return
    actual = step_checksums(self.directory / str(step))
    for name, digest in expected.items():
      if actual.get(name) != digest:
        problem = 'is missing' if name not in actual else 'differs from its checksum'
        raise IOError(f'{self.directory / str(step) / name} {problem}')

  def restore_latest(self, target):
    """The newest checkpoint that verifies and restores into `target`'s structure, or `target` if none exists.

    A checkpoint whose arrays have other shapes than `target`'s was written by another model: InputError
    naming them, before any array is read (and nothing is moved aside)."""
    steps = sorted(self.all_steps(), reverse=True)
    failed = []
    for step in steps:
      check_shapes(self.directory / str(step), target)
      try:
        self.verify(step)
        restored = self.restore(step, target)
      except Exception as e:  # pylint: disable=broad-except
        logging.error('Checkpoint of step %d in %s could not be restored (%s: %s); trying an older one.',
                      step, self.directory, type(e).__name__, e)
        failed.append(step)
        continue
      logging.info('Resumed from the checkpoint of step %d in %s.', step, self.directory)
      self._quarantine(failed)
      return restored
    if steps:
      raise errors.RunStateError(f'No checkpoint in {self.directory} could be restored (steps {steps}; the errors '
                                 'are logged above). Nothing was moved or deleted: fix or remove them, or use a new '
                                 '--workdir.')
    return target

  def restore(self, step: int, target=None):
    """The train state of `step`, into `target`'s structure, or as saved (host arrays) without one."""
    args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)})
    return self._new_manager().restore(step, args=args)[STATE_ITEM]

  def _quarantine(self, steps: list[int]) -> None:
    """Moves unrestorable step folders aside, so that the run can save those steps again."""
    if not steps:
      return
    if jax.process_index() == 0:
      for step in steps:
        destination = self.workdir / QUARANTINE / f'{step}-{int(time.time())}'
        destination.parent.mkdir(parents=True, exist_ok=True)
        (self.directory / str(step)).rename(destination)
        record = self.workdir / CHECKSUMS / f'{step}.json'
        if record.exists():
          record.unlink()
        logging.warning('Moved the unrestorable checkpoint of step %d to %s.', step, destination)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('hivlp_jax: checkpoints quarantined')
    self.manager = self._new_manager()


def _names(path) -> tuple[str, ...]:
  return tuple(str(getattr(key, 'key', getattr(key, 'name', getattr(key, 'idx', key)))) for key in path)


def check_shapes(step_dir: files.PathLike, target) -> None:
  """Raises InputError when arrays of the checkpoint in `step_dir` have other shapes than the same-named
  leaves of `target` (arrays or shape structs): the checkpoint was written by another model config. An
  unreadable metadata file is left to the restore to report."""
  try:
    saved = saved_tree(step_dir)
  except Exception:  # pylint: disable=broad-except  # A damaged step: the restore names the problem.
    return
  saved_shapes = {_names(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(saved)
                  if hasattr(leaf, 'shape')}
  wrong = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(target):
    name = _names(path)
    if name in saved_shapes and hasattr(leaf, 'shape') and saved_shapes[name] != tuple(np.shape(leaf)):
      wrong.append(f'{".".join(name)}: saved {saved_shapes[name]}, this config {tuple(np.shape(leaf))}')
  if wrong:
    raise errors.InputError(
        f'The checkpoint {step_dir} was written by another model: {len(wrong)} arrays differ in shape '
        f'({"; ".join(wrong[:3])}). Run with the config that trained it (its WORKDIR/config.json), or use a new '
        '--workdir.')


class _DataState(grain.DatasetIterator):
  """A saved data state in the shape grain's orbax handler takes: it saves `get_state()` and restores by
  `set_state`; the stream itself is rebuilt from it by the trainer."""

  def __init__(self, state: Optional[dict] = None):
    super().__init__()
    self.state = state

  def __next__(self):
    raise StopIteration

  def get_state(self) -> Optional[dict]:
    return self.state

  def set_state(self, state: dict) -> None:
    self.state = state


def saved_tree(step_dir: files.PathLike) -> dict:
  """The checkpoint's tree of array metadata (`.shape`, `.dtype`), read without reading any array."""
  return ocp.PyTreeCheckpointHandler().metadata(files.path(step_dir) / STATE_ITEM).tree


def restore_params(workdir: str, abstract_params=None, step: Optional[int] = None, key: str = 'params',
                   step_name: str = '--step') -> tuple[Any, int]:
  """Only the `params` (or another top-level `key`, e.g. 'ema_params') of a workdir's checkpoint.

  abstract_params: the tree's shapes and dtypes (e.g. `jax.eval_shape` of the model's init), checked
    against the checkpoint's; None: as saved (another model's parameters, see `init_from_run`).
  step: that checkpoint, or None: the newest one that verifies and restores (older ones are tried in turn);
    `step_name` names it in errors.
  Returns (the tree as host arrays, the step).
  """
  checkpoints = Checkpoints(workdir, max_to_keep=1, create=False)
  steps = sorted(checkpoints.all_steps(), reverse=True)
  if not steps:
    raise errors.MissingInputError(f'No checkpoint in {checkpoints.directory}: train there first.')
  if step is not None and step not in steps:
    raise errors.InputError(f'{step_name}={step}: {checkpoints.directory} holds steps {sorted(steps)}.')
  for candidate in [step] if step is not None else steps:
    step_dir = checkpoints.directory / str(candidate)
    if abstract_params is None:  # As saved: nothing to check the shapes against.
      try:
        item = {key: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved_tree(step_dir)[key])}
      except KeyError:
        raise errors.InputError(f'The checkpoint {step_dir} holds no {key!r}.') from None
    else:
      item = {key: abstract_params}
      check_shapes(step_dir, item)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    try:
      checkpoints.verify(candidate)
      restored = ocp.PyTreeCheckpointer().restore(
          step_dir / STATE_ITEM, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                            partial_restore=True))
      return restored[key], candidate
    except Exception as e:  # pylint: disable=broad-except
      if step is not None or candidate == steps[-1]:
        raise
      logging.error('%s of step %d in %s could not be restored (%s: %s); trying an older step.',
                    key, candidate, checkpoints.directory, type(e).__name__, e)
  raise AssertionError('unreachable')


def read_config_record(path: files.PathLike) -> dict:
  """The flat config a run recorded at `path` (WORKDIR/config.json); InputError when it is not JSON."""
  try:
    return files.read_json(path)
  except ValueError as e:
    raise errors.InputError(f'{path} is not valid JSON ({e}): it records the config of the run in that workdir. '
                            'Restore it, or delete it (training then resumes without the check; the query tool '
                            'needs --config=FILE).') from None


def check_recorded(path: files.PathLike, current: dict, may_change: Callable[[str], bool], what: str) -> None:
  """Records `current` (flat, JSON-able) at `path`, or checks it against the record a previous run left.

  A key the record lacks was added to the code after that run started: it is reported and its current value
  applies. Any other difference, except keys for which `may_change(key)` is True, is an error naming it.
  """
  path = files.path(path)
  if path.exists():
    saved = read_config_record(path)
    added = sorted(set(current) - set(saved))
    if added:
      logging.warning('Config fields new since the run in %s started (their current values apply): %s',
                      path.parent, ', '.join(f'{k}={current[k]!r}' for k in added[:20]))
    bad = [k for k in sorted(saved) if saved.get(k) != current.get(k) and not may_change(k)]
    if bad:
      details = '; '.join(f'{k}: {saved.get(k)!r} -> {current.get(k)!r}' for k in bad[:8])
      raise errors.InputError(f'Workdir {str(path.parent)!r} holds {what} of another config ({details}). '
                              'Use a new --workdir, or pass the same config to resume that run.')
  if jax.process_index() == 0:
    files.write_json(path, current)
