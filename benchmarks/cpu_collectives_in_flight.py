r"""Does a pmapped step with collectives deadlock on the CPU backend when steps queue up? (XLA CPU)

  python benchmarks/cpu_collectives_in_flight.py --limits=0,2,1 --repeats=3 --seconds=60 \
      --busy_processes=2 --out=docs/cpu_collectives_in_flight.json

Each try is a fresh process with --devices simulated CPU devices that loops a small data-parallel step
(an MLP, an all_gather of its normalised outputs for an in-batch softmax loss, pmean of the gradients:
the shape of the train step) for --seconds. `--limits`: how many steps may be queued at once
(`steps_in_flight.StepsInFlight`); 0 = no bound, every step dispatched at once, as a plain loop does.
--busy_processes spin beside it, so the host is loaded as it is beside a second job. A try that hits
XLA's "Termination timeout for all gather ... exceeded" (40 s after the last device stopped arriving)
aborts; the table says how many tries of each limit did, and after how many steps.

What the bound costs the real training loop (`--train_config`): each try trains that config from scratch
in a fresh process for --train_steps steps (`hivlp_jax.main --stop_after_step`, no evaluation) with the
limit in place of `steps_in_flight.default_limit()`, and reports the examples/s the loop logs after its
first window (compilation):

  python benchmarks/cpu_collectives_in_flight.py --train_config=configs/default.py --limits=1,2 \
      --repeats=3 --busy_processes=0 --out=docs/steps_in_flight_cost.json
"""

import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_list('limits', ['0', '2', '1'], 'Steps in flight to try; 0 = unbounded.')
  flags.DEFINE_integer('repeats', 3, 'Tries per limit (fresh processes), interleaved.')
  flags.DEFINE_float('seconds', 60.0, 'How long each try loops steps when it does not deadlock.')
  flags.DEFINE_integer('devices', 4, 'Simulated CPU devices of each try.')
  flags.DEFINE_integer('batch', 64, 'Examples per device.')
  flags.DEFINE_integer('busy_processes', 2, 'Spinning processes beside the tries (a loaded host).')
  flags.DEFINE_integer('nice', 0, 'Niceness of the tries (19: starved beside the busy processes).')
  flags.DEFINE_string('out', '', 'JSON results (default: none, the table only).')
  flags.DEFINE_string('train_config', '', 'Measure the training loop of this config instead (examples/s).')
  flags.DEFINE_integer('train_steps', 120, 'Steps of each training try (--train_config).')
  flags.DEFINE_integer('log_every', 20, 'Steps per logged examples/s window (--train_config).')


CHILD = r'''
import os, sys, time
import jax, jax.numpy as jnp, numpy as np
from hivlp_jax import steps_in_flight
limit, seconds, batch = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
n, width = jax.local_device_count(), 192

def loss(w, x):
  h = jax.nn.gelu(x @ w['a']) @ w['b']
  z = h / jnp.linalg.norm(h, axis=-1, keepdims=True)
  logits = z @ jax.lax.all_gather(z, 'd', tiled=True).T / 0.07
  rows = jnp.arange(z.shape[0])
  return -jnp.mean(jax.nn.log_softmax(logits)[rows, rows + jax.lax.axis_index('d') * z.shape[0]])

def step(w, x):
  value, grads = jax.value_and_grad(loss)(w, x)
  grads = jax.lax.pmean(grads, 'd')
  return jax.tree.map(lambda p, g: p - 0.01 * g, w, grads), jax.lax.pmean(value, 'd')

p_step = jax.pmap(step, axis_name='d', donate_argnums=(0,))
rng = np.random.default_rng(0)
w = {'a': rng.normal(size=(width, 4 * width)) * 0.05, 'b': rng.normal(size=(4 * width, width)) * 0.05}
w = {k: np.repeat(v[None].astype(np.float32), n, 0) for k, v in w.items()}
x = rng.normal(size=(n, batch, width)).astype(np.float32)
in_flight = steps_in_flight.StepsInFlight(limit) if limit else None
start, steps = time.perf_counter(), 0
while time.perf_counter() - start < seconds:
  if in_flight:
    in_flight.wait()
  w, value = p_step(w, x)
  if in_flight:
    in_flight.add(value)
  steps += 1
  if steps % 20 == 0:
    print(f'STEPS {steps}', flush=True)
jax.block_until_ready(w)
print(f'DONE {steps}', flush=True)
'''


TRAIN_CHILD = r'''
import sys
from absl import app
from hivlp_jax import config_lib, main, steps_in_flight
limit = int(sys.argv.pop(1))
steps_in_flight.default_limit = lambda: limit or 1_000_000
app.run(main.main, flags_parser=config_lib.parse_flags)
'''


def _spin():
  while True:
    pass


def run_try(limit: int, workdir: str) -> dict:
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={FLAGS.devices}',
             JAX_PLATFORMS='cpu')
  if FLAGS.train_config:
    args = ['-c', TRAIN_CHILD, str(limit), f'--config={FLAGS.train_config}', f'--workdir={workdir}',
            f'--stop_after_step={FLAGS.train_steps}', f'--config.log_every_steps={FLAGS.log_every}',
            f'--config.checkpoint_every_steps={FLAGS.train_steps}']
  else:
    args = ['-c', CHILD, str(limit), str(FLAGS.seconds), str(FLAGS.batch)]
  start = time.perf_counter()
  result = subprocess.run(['nice', '-n', str(FLAGS.nice), sys.executable] + args, env=env, capture_output=True,
                          text=True, timeout=FLAGS.seconds + 1800)
  output = result.stdout + result.stderr
  steps = [int(s) for s in re.findall(r'(?:STEPS|DONE) (\d+)', output)]
  speeds = [float(s) for s in re.findall(r'examples_per_sec=([0-9.]+)', output)]
  return {'limit': limit, 'returncode': result.returncode, 'seconds': round(time.perf_counter() - start, 1),
          'completed': 'DONE' in result.stdout or (bool(FLAGS.train_config) and result.returncode == 0),
          'collective_timeout': 'Termination timeout' in output,
          'steps_before_end': max(steps, default=0),
          'examples_per_sec_after_first_window': speeds[1:]}


def _print_abort_table(limits, tries):
  print(f'\n{FLAGS.devices} simulated devices, {FLAGS.busy_processes} busy processes beside, nice '
        f'{FLAGS.nice}, {FLAGS.seconds:g} s a try\n')
  print('| steps in flight | tries | aborted (collective timeout) | steps before each end |')
  print('|---|---|---|---|')
  for limit in limits:
    mine = [t for t in tries if t['limit'] == limit]
    aborted = sum(t['collective_timeout'] for t in mine)
    ends = ', '.join(f"{t['steps_before_end']}{'' if t['completed'] else ' (abort)'}" for t in mine)
    print(f"| {limit or 'unbounded'} | {len(mine)} | {aborted} | {ends} |")


def main(argv):
  del argv
  limits = [int(x) for x in FLAGS.limits]
  spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(FLAGS.busy_processes)]
  for spinner in spinners:
    spinner.start()
  tries = []
  try:
    with tempfile.TemporaryDirectory() as root:
      for repeat in range(FLAGS.repeats):
        for limit in limits:
          tries.append(dict(run_try(limit, os.path.join(root, f'{limit}_{repeat}')), repeat=repeat))
          print(json.dumps(tries[-1]), flush=True)
  finally:
    for spinner in spinners:
      spinner.terminate()
  if FLAGS.train_config:
    print(f'\n{FLAGS.train_config}, {FLAGS.devices} simulated devices, {FLAGS.train_steps} steps a try\n')
    print('| steps in flight | median examples/s | per try (median of its windows after the first) | aborted |')
    print('|---|---|---|---|')
    for limit in limits:
      mine = [t for t in tries if t['limit'] == limit]
      per_try = [float(np.median(t['examples_per_sec_after_first_window'])) for t in mine
                 if t['examples_per_sec_after_first_window']]
      print(f"| {limit or 'unbounded'} | {np.median(per_try) if per_try else float('nan'):.1f} | "
            f"{', '.join(f'{x:.1f}' for x in per_try)} | {sum(t['collective_timeout'] for t in mine)} |")
  else:
    _print_abort_table(limits, tries)
  if FLAGS.out:
    from hivlp_jax import files  # pylint: disable=g-import-not-at-top
    files.write_json(FLAGS.out, {'flags': {k: FLAGS[k].value for k in (
        'limits', 'repeats', 'seconds', 'devices', 'batch', 'busy_processes', 'nice', 'train_config',
        'train_steps', 'log_every')},
        'cpu_count': os.cpu_count(), 'tries': tries})


if __name__ == '__main__':
  define_flags()
  app.run(main)
