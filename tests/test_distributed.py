"""A real multi-process run: 2 processes x 2 CPU devices on localhost, through jax.distributed.

With momentum queues sharded over the 4 devices of both processes, KL alignment and the filter, preempted
by a SIGTERM that only one process receives (both must stop after the same step and checkpoint it) and
resumed from that checkpoint, it must train exactly like one uninterrupted process with 4 devices: the same
global batches, the same losses.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np

from hivlp_jax import train
from hivlp_jax.data import pipeline
from tests.conftest import tiny_config
from tests.conftest import xla_flags


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _losses(log: str) -> dict[int, float]:
  """{step: loss} from the run's metric log lines ('[step] ... loss=X, ...')."""
  return {int(step): float(loss) for step, loss in re.findall(r'\] \[(\d+)\] .*?\bloss=([-\d.e]+)', log)}


# Two global batches of queue: by step 4 the resumed run reads slots that the first run wrote.
COTS_FLAGS = ('--config.contrastive.queue_size=64', '--config.contrastive.kl_weight=0.5',
              '--config.contrastive.filter_noisy_pairs=True', '--config.contrastive.filter_k=1.0',
              '--config.log_every_steps=1')  # Each step's own loss: the resumed run's log windows start at 4.


def _command(workdir, data_dir, *extra):
  return [sys.executable, '-m', 'hivlp_jax.main', '--config=configs/tiny.py', f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}', *COTS_FLAGS, *extra]


def _run_two_processes(workdir, data_dir, env, *extra, sigterm_process: int = -1) -> list[str]:
  """Both processes' logs. With `sigterm_process`, that process alone gets a SIGTERM as soon as it logs
  that training starts (its first step is still compiling), and both must exit as preempted."""
  port = _free_port()
  processes = [
      subprocess.Popen(_command(workdir, data_dir, '--distributed', f'--coordinator_address=127.0.0.1:{port}',
                                '--num_processes=2', f'--process_id={i}', *extra),
                       env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  try:
    early = []
    if sigterm_process >= 0:
      for line in processes[sigterm_process].stdout:
        early.append(line)
        if 'Training from step' in line:
          processes[sigterm_process].send_signal(signal.SIGTERM)
          break
    logs = [p.communicate(timeout=400)[0] for p in processes]
    if sigterm_process >= 0:
      logs[sigterm_process] = ''.join(early) + logs[sigterm_process]
  finally:
    for p in processes:
      p.kill()
  want = 0 if sigterm_process < 0 else train.EXIT_PREEMPTED
  for i, (p, log) in enumerate(zip(processes, logs)):
    assert p.returncode == want, f'process {i} exited with {p.returncode}, not {want}:\n{log[-3000:]}'
  return logs


def _stop_step(log: str) -> int:
  (step,) = re.findall(r'Stopped by .* after step (\d+) of \d+: checkpointed', log)
  return int(step)


def test_two_processes_train_like_one_process_with_four_devices(data_dir, tmp_path):
  pipeline.get_tokenizer(tiny_config(data_dir))  # Prepared once, as a shared filesystem would hold it.
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', XLA_FLAGS=xla_flags(2))
  multi = str(tmp_path / 'multi')
  first = _run_two_processes(multi, data_dir, env, sigterm_process=1)
  assert 'JAX devices: 2 local of 4 on 2 processes' in first[0]
  # Process 0 got no signal and still stopped with process 1, after the same step.
  assert 'Stopped by SIGTERM (on another process)' in first[0] and 'Stopped by SIGTERM after' in first[1]
  stop = _stop_step(first[0])
  assert stop == _stop_step(first[1]) and 1 <= stop < 6
  assert not os.path.exists(os.path.join(multi, 'metrics.json'))
  resumed = _run_two_processes(multi, data_dir, env)
  assert f'Resumed from the checkpoint of step {stop}' in resumed[0]

  single = str(tmp_path / 'single')
  env['XLA_FLAGS'] = xla_flags(4)
  reference = subprocess.run(_command(single, data_dir), env=env, capture_output=True, text=True, timeout=400)
  assert reference.returncode == 0, reference.stderr[-3000:]

  multi_losses = {**_losses(first[0]), **_losses(resumed[0])}
  single_losses = _losses(reference.stderr + reference.stdout)
  assert sorted(multi_losses) == sorted(single_losses) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([multi_losses[s] for s in range(1, 7)], [single_losses[s] for s in range(1, 7)],
                             rtol=1e-4)
  assert os.path.exists(os.path.join(multi, 'metrics.json'))
  assert '6' in os.listdir(os.path.join(multi, 'checkpoints'))

  # --mode=evaluate of the same checkpoint with its galleries sharded over the two processes (each embeds
  # and indexes half of each gallery) equals one process with 2 devices (the same per-device batches).
  sharded = _run_two_processes(multi, data_dir, dict(env, XLA_FLAGS=xla_flags(2)), '--mode=evaluate')
  assert 'Galleries sharded over 2 processes' in sharded[0]
  path = os.path.join(multi, 'metrics', 'embedded_scenes', 'test', 'step_6.json')
  sharded_metrics = json.loads(open(path).read())
  env['XLA_FLAGS'] = xla_flags(2)
  one = subprocess.run(_command(multi, data_dir, '--mode=evaluate'), env=env, capture_output=True, text=True,
                       timeout=400)
  assert one.returncode == 0, one.stderr[-3000:]
  one_metrics = json.loads(open(path).read())
  exact = [name for name in one_metrics if name.startswith('exact_dim')]
  assert len(exact) >= 2 and sharded_metrics['step'] == one_metrics['step'] == 6
  for name in exact:
    recalls = {key: value for key, value in one_metrics[name].items()
               if key.endswith(('_r1', '_r5', '_r10', 'rsum', '_medr'))}
    assert {key: sharded_metrics[name][key] for key in recalls} == recalls, name
  # Coarse-to-fine modes shortlist per share: the same modes, each with finite recall.
  assert sorted(sharded_metrics) == sorted(one_metrics)
  assert all(np.isfinite(metrics['rsum']) for metrics in sharded_metrics.values() if isinstance(metrics, dict))
