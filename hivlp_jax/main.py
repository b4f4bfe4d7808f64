r"""Runs a training + evaluation job from a config file.

  python -m hivlp_jax.main --config=configs/default.py --workdir=runs/default [--config.num_train_steps=N]
  python -m hivlp_jax.main --mode=tokenizer --config=configs/default.py --workdir=runs/tokenizer_default
  python -m hivlp_jax.main --mode=evaluate --workdir=runs/default [--step=N] [--config=FILE --config.eval.x=...]
The second trains the visual tokenizer (discrete VAE) whose codes masked vision modeling predicts. The third
evaluates a trained workdir's checkpoint without training (its own config unless --config is given) on each
set of config.eval.datasets (default: the run's own), writing WORKDIR/metrics/<set>/<split>/step_<N>.json.

On CPU, simulate several devices with XLA_FLAGS=--xla_force_host_platform_device_count=N (see
launch/local.sh). Multi-host runs call jax.distributed.initialize() through --distributed.
On SIGTERM/SIGINT training checkpoints the current step and exits with status 75 (train.EXIT_PREEMPTED).
"""

import sys

from absl import app
from absl import flags
from absl import logging
import jax
from jax.experimental import multihost_utils
from ml_collections import config_flags

from hivlp_jax import config_lib
from hivlp_jax import errors
from hivlp_jax import evaluators
from hivlp_jax import gallery
from hivlp_jax import log_filter
from hivlp_jax import train
from hivlp_jax import visual_tokenizer
from hivlp_jax.data import pipeline

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and TensorBoard events.')
flags.DEFINE_enum('mode', 'train', ['train', 'tokenizer', 'evaluate'], 'train: two-tower training + evaluation; '
                  'evaluate: evaluate a workdir\'s checkpoint (--step) without training; '
                  'tokenizer: the visual tokenizer stage (visual_tokenizer.train_tokenizer).')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (multi-host TPU/GPU, SLURM). '
                  'On TPU VMs and under SLURM the coordinator is found automatically.')
flags.DEFINE_string('coordinator_address', None, 'With --distributed: host:port of process 0, when not automatic.')
flags.DEFINE_integer('num_processes', None, 'With --distributed: number of processes, when not automatic.')
flags.DEFINE_integer('process_id', None, 'With --distributed: this process, when not automatic.')
flags.DEFINE_integer('stop_after_step', None, 'Checkpoint at this step and exit without evaluating (for jobs '
                     'with a time limit); running again with the same workdir resumes from there.')
flags.DEFINE_integer('step', None, 'With --mode=evaluate: the checkpoint step (default: the newest).')
flags.mark_flags_as_required(['workdir'])


@errors.one_line_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  log_filter.quiet_library_logs()
  if FLAGS.distributed:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  logging.info('JAX devices: %d local of %d on %d processes (%s).', jax.local_device_count(),
               jax.device_count(), jax.process_count(), jax.devices()[0].platform)
  if FLAGS.mode == 'evaluate':  # The run's own config, or --config checked against it (model and data).
    config = gallery.load_config(FLAGS.workdir, FLAGS.config)
    config_lib.validate(config)
    evaluators.evaluate_workdir(config, FLAGS.workdir, step=FLAGS.step)
    return
  if FLAGS.config is None:
    raise errors.InputError(f'--config is required with --mode={FLAGS.mode} (e.g. --config=configs/default.py).')
  if jax.process_count() > 1:
    # One process generates the data set and trains the tokenizer; the others wait, then read them.
    if jax.process_index() == 0:
      pipeline.get_tokenizer(FLAGS.config)
    multihost_utils.sync_global_devices('hivlp_jax: data prepared')
  if FLAGS.mode == 'tokenizer':
    visual_tokenizer.train_tokenizer(FLAGS.config, FLAGS.workdir)
    return
  if FLAGS.stop_after_step is not None and FLAGS.stop_after_step < 1:
    raise errors.InputError(f'--stop_after_step={FLAGS.stop_after_step} must be >= 1.')
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir, stop_after_step=FLAGS.stop_after_step)
  except train.Preempted as e:
    logging.warning('%s', e)
    sys.exit(train.EXIT_PREEMPTED)
  except KeyboardInterrupt:  # A second SIGINT/SIGTERM: stopped at once, without the checkpoint.
    sys.exit('Interrupted twice: stopped without checkpointing the current step; the last checkpoint stands.')


if __name__ == '__main__':
  app.run(main, flags_parser=config_lib.parse_flags)
