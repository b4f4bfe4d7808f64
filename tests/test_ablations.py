"""benchmarks/ablations.py end to end on the tiny config: seeds, statistics, projections and resuming."""

import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys

import numpy as np

from tests import conftest

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_ablations(root, data_dir, *args) -> str:
  env = dict(os.environ, XLA_FLAGS=conftest.xla_flags(2))
  command = [sys.executable, str(REPO / 'benchmarks' / 'ablations.py'), '--sweep=mrl', '--config=configs/tiny.py',
             f'--root={root}', f'--out={root}/out.json', '--dims=8,64', '--pca_fit_images=128',
             f'--extra=data.data_dir={data_dir}', *args]
  done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def test_two_seeds_summary_projections_and_resume(data_dir, tmp_path):
  root = tmp_path / 'ablations'
  stdout = run_ablations(root, data_dir, '--variants=full_only', '--seeds=0,1')
  assert stdout.count('hivlp_jax.main --mode=train') == 2
  out = json.loads((root / 'out.json').read_text())
  result = out['results']['full_only']
  runs = result['runs']
  assert sorted(runs) == ['0', '1']
  for run in runs.values():
    # The one-loss model read at its full prefix is the evaluator's exact search: same path, same numbers.
    assert run['truncate_dim64'] == {k: v for k, v in run['exact_dim64'].items() if k in run['truncate_dim64']}
    assert 0 <= run['pca_dim8']['rsum'] <= 600 and np.isfinite(run['pca_dim8']['rsum'])
  # The seeds differ (their recalls too), and the summary is their mean and sample std.
  values = [runs[s]['truncate_dim8']['rsum'] for s in ('0', '1')]
  assert values[0] != values[1]
  summary = result['summary']['truncate_dim8']['rsum']
  assert np.isclose(summary['mean'], statistics.mean(values)) and np.isclose(summary['std'], statistics.stdev(values))
  assert (summary['min'], summary['max'], summary['n']) == (min(values), max(values), 2)
  assert '| full_only: one full-dim loss | exact_dim64 |' in out['table']

  # A finished sweep is read back without training; a run killed after its last checkpoint resumes from it
  # and ends with the same recall.
  seed_1 = root / 'full_only' / 'seed_1'
  (seed_1 / 'metrics.json').unlink()
  (seed_1 / 'projections.json').unlink()
  stdout = run_ablations(root, data_dir, '--variants=full_only', '--seeds=0,1')
  assert stdout.count('hivlp_jax.main --mode=train') == 1 and f'--workdir={seed_1}' in stdout
  again = json.loads((root / 'out.json').read_text())['results']['full_only']
  for mode in ('exact_dim64', 'truncate_dim8', 'pca_dim8'):
    assert again['runs']['1'][mode]['rsum'] == runs['1'][mode]['rsum']
  shutil.rmtree(root)
