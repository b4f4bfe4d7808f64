"""The training loop of the two towers: data-parallel (`jax.pmap`, axis 'batch'), resumable, preemption-safe.

SIGTERM or SIGINT (TPU VMs and SLURM send SIGTERM before preempting a job) finishes the current step,
checkpoints it, waits for the save to commit and exits with `EXIT_PREEMPTED`; every process of a multi-host
job stops at the same step. A rerun in the same workdir resumes bit-identically. `config.train_minutes`
(a fixed time slot) ends training at the first step that finishes after that many minutes since the start,
checkpoints it and evaluates it; a rerun continues training.
"""

import dataclasses
import functools
import signal
import time
from typing import Iterator, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from hivlp_jax import checkpointing
from hivlp_jax import config_lib
from hivlp_jax import errors
from hivlp_jax import evaluators
from hivlp_jax import files
from hivlp_jax import masking
from hivlp_jax import replication
from hivlp_jax import steps_in_flight
from hivlp_jax import train_step
from hivlp_jax import workdir_lock
from hivlp_jax.data import pipeline
from hivlp_jax.data import streaming
from hivlp_jax.data import webdataset

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after checkpointing; run again to resume.


class Preempted(Exception):
  """Training stopped on SIGTERM/SIGINT after checkpointing `step`."""

  def __init__(self, step: int, signal_name: str):
    super().__init__(f'{signal_name}: checkpointed step {step}; run again with the same --workdir to resume.')
    self.step = step


class StopSignals:
  """While active, SIGTERM and SIGINT ask the loop to stop after the current step (a second one aborts)."""

  def __init__(self):
    self.received: Optional[str] = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.received is not None:  # Asked twice: stop now, without the checkpoint.
      raise KeyboardInterrupt
    self.received = signal.Signals(signum).name
    logging.warning('%s received: stopping after the current step, with a checkpoint of it.', self.received)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def stop_requested(self, out_of_time: bool = False) -> tuple[bool, bool]:
    """(a signal arrived, the time budget ran out) on any process: one collective with several processes,
    so that all agree."""
    flags = np.array([self.received is not None, out_of_time])
    if jax.process_count() > 1:
      flags = np.asarray(multihost_utils.process_allgather(flags)).any(axis=0)
      if flags[0] and self.received is None:
        self.received = 'SIGTERM (on another process)'
    return bool(flags[0]), bool(flags[1])


def masking_transform(config: ml_collections.ConfigDict, tokenizer) -> Optional[functools.partial]:
  """The host-side masking of config.mvlm for `pipeline.train_batches`, or None without MVLM."""
  settings = config.mvlm
  if not (settings.mlm_weight or settings.mvm_weight):
    return None
  grid = config.model.image_size // config.model.image.patch_size
  return functools.partial(
      masking.mask_batch, text_mask_ratio=settings.text_mask_ratio, image_mask_ratio=settings.image_mask_ratio,
      min_block_patches=settings.min_block_patches, grid=(grid, grid), mask_id=tokenizer.special_ids['[MASK]'],
      vocab_size=tokenizer.vocab_size, special_ids=tuple(tokenizer.special_ids.values()),
      mask_text_tokens=settings.mlm_weight > 0, mask_patches=settings.mvm_weight > 0)


def training_batches(config: ml_collections.ConfigDict, checkpoints: checkpointing.Checkpoints, tokenizer,
                     start_step: int) -> tuple[Iterator[dict], Optional[streaming.TrainStream]]:
  """The batches of steps start_step + 1, ... in pmap layout, and the stream when the data set is streamed.

  A streamed data set resumes from the data state saved in the checkpoint of `start_step`; the embedded one
  is indexed by step and needs no saved state.
  """
  transform = masking_transform(config, tokenizer)
  if pipeline.is_streamed(config):
    data_state = None
    if start_step:
      data_state = checkpoints.data_state(start_step)
      if data_state is None:
        logging.warning('No data state saved with the checkpoint of step %d: the training data restarts '
                        'from its beginning.', start_step)
    stream = streaming.create_train_stream(config, tokenizer, state=data_state, transform=transform)
    return stream, stream
  train_data = pipeline.load_split(config, 'train', tokenizer)
  logging.info('Training data: %d %s, %d captions each; vocabulary of %d.', train_data.num_images,
               'clips' if train_data.images.ndim == 5 else 'images', train_data.captions_per_image,
               tokenizer.vocab_size)
  if config.mvlm.mvm_weight:
    from hivlp_jax import visual_tokenizer  # pylint: disable=g-import-not-at-top  (the MVM stage only)
    train_data = dataclasses.replace(train_data, image_codes=visual_tokenizer.load_codes(config, 'train'))
  batches = pipeline.train_batches(train_data, config.batch_size, config.seed, start_step, transform=transform,
                                   num_frames=config.model.video.num_frames)
  return batches, None


def _summary(pending_metrics: list, batch_size: int, elapsed: float, stream) -> dict:
  """The mean of the logged window's metrics, its throughput and the skipped-data counts."""
  summary = {k: float(np.mean([m[k][0] for m in pending_metrics])) for k in pending_metrics[0]}
  summary['examples_per_sec'] = len(pending_metrics) * batch_size / elapsed
  summary['nonfinite_steps'] = summary.pop('nonfinite') * len(pending_metrics)
  if stream is not None:  # Every process logs (a collective), so the counts are global.
    summary.update({f'data_skipped_{reason}': count
                    for reason, count in webdataset.global_stats(stream.stats).as_dict().items()
                    if reason != 'samples'})
  return summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_after_step: Optional[int] = None) -> Optional[dict]:
  """Trains (resuming from `workdir` when it holds a checkpoint), then evaluates. Returns the results.

  With `stop_after_step` (for time-limited jobs), training checkpoints at that step and returns None
  before evaluating; running again in the same workdir resumes from there. Raises `Preempted` after
  checkpointing when SIGTERM/SIGINT arrives.
  """
  started = time.monotonic()
  config_lib.validate(config)
  files.make_dir(workdir)
  with workdir_lock.WorkdirLock(workdir), StopSignals() as signals:
    deadline = started + 60 * config.train_minutes if config.train_minutes else None
    return _train_and_evaluate(config, workdir, stop_after_step, signals, deadline)


def _train_and_evaluate(config, workdir, stop_after_step, signals: StopSignals,
                        deadline: Optional[float]) -> Optional[dict]:
  # clu's writers import TensorFlow (seconds, 700 MiB): only the training loop needs them, not the step.
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  run_dir = files.path(workdir)
  if (run_dir / checkpointing.CHECKPOINTS).exists() and not (run_dir / config_lib.CONFIG_FILE).exists():
    logging.warning('%s holds checkpoints but no %s: the config cannot be checked against them.', workdir,
                    config_lib.CONFIG_FILE)
  config_lib.check_workdir_config(workdir, config)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() != 0)

  tokenizer = pipeline.get_tokenizer(config)
  pipeline.record_vocabulary(workdir, config, tokenizer)
  evaluator_list = evaluators.from_config(config, tokenizer)  # Checks their splits now, before training.
  model = train_step.create_model(config, tokenizer.vocab_size)
  checkpoints = checkpointing.Checkpoints(workdir, config.max_checkpoints_to_keep)
  # config.init's run seeds only a fresh run: a resumed one restores its own state.
  state = replication.with_global_queues(train_step.create_train_state(
      config, model, jax.random.key(config.seed), from_init_run=not checkpoints.all_steps()))
  state = checkpoints.restore_latest(state)
  start_step = int(state.step)
  if start_step == 0:
    writer.write_hparams(config_lib.flatten(config))
  state = replication.replicate_state(state)

  p_train_step = train_step.make_pmapped_train_step(config)
  batches, stream = training_batches(config, checkpoints, tokenizer, start_step)
  report_progress = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps, writer=writer,
                                                    every_steps=config.log_every_steps, every_secs=None)
  logging.info('Training from step %d to %d on %d devices (%d local).', start_step, config.num_train_steps,
               jax.device_count(), jax.local_device_count())
  pending_metrics = []
  window_start = time.perf_counter()
  end_step = config.num_train_steps if stop_after_step is None else min(stop_after_step, config.num_train_steps)

  def save(step):  # A streamed run's checkpoint holds the data state that follows it.
    checkpoints.save(step, replication.unreplicate_state(state), None if stream is None else stream.get_state())

  in_flight = steps_in_flight.StepsInFlight()
  for step in range(start_step + 1, end_step + 1):
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      batch = next(batches)
      in_flight.wait()
      state, metrics = p_train_step(state, batch)
    in_flight.add(metrics)
    pending_metrics.append(metrics)
    report_progress(step)
    stop, out_of_time = signals.stop_requested(deadline is not None and time.monotonic() > deadline)
    last = step == end_step or out_of_time
    if step % config.log_every_steps == 0 or last or stop:
      writer.write_scalars(step, _summary(pending_metrics, config.batch_size, time.perf_counter() - window_start,
                                          stream))
      pending_metrics, window_start = [], time.perf_counter()
      checkpoints.record_finished()
      nonfinite_run = int(state.nonfinite_steps[0])
      if nonfinite_run >= config.max_consecutive_nonfinite_steps:
        checkpoints.wait()
        raise errors.NonFiniteError(
            f'The loss, gradient or update was not finite for {nonfinite_run} steps in a row up to step {step}; '
            f'those steps were skipped and nothing non-finite was checkpointed. The last good checkpoint is in '
            f'{checkpoints.directory} (steps {checkpoints.all_steps()}). Lower config.optimizer.learning_rate '
            'or check the input data.')
    if step % config.checkpoint_every_steps == 0 or last or stop:
      save(step)
    if stop:
      checkpoints.close()
      if stream is not None:
        stream.close()
      logging.warning('Stopped by %s after step %d of %d: checkpointed; run again to resume.', signals.received,
                      step, config.num_train_steps)
      raise Preempted(step, signals.received)
    if out_of_time:
      logging.warning('config.train_minutes=%g used up after step %d of %d: checkpointed; evaluating it. Run again '
                      'to continue training.', config.train_minutes, step, config.num_train_steps)
      break
  checkpoints.close()
  if stream is not None:
    stream.close()
    logging.info('Training data (all processes): %s.', webdataset.count_by_reason(webdataset.global_stats(stream.stats)))
  final_step = int(state.step[0])
  if final_step == end_step < config.num_train_steps:
    logging.info('Stopped after step %d of %d as asked; run again to resume.', end_step, config.num_train_steps)
    return None
  results = evaluators.run_all(evaluator_list, model, state.params, final_step)
  if jax.process_index() == 0:
    for name, metrics in results.items():
      writer.write_scalars(final_step, {f'eval/{name}/{k}': v for k, v in metrics.items()})
  writer.flush()
  evaluators.write_results(workdir, results, final_step, config)
  return results
