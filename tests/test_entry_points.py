"""Every command the README and docs/ name starts and prints its usage.

Each tool runs as a user would run it, as a subprocess of this interpreter (the venv's) from a directory
other than the repo root and without PYTHONPATH, so `hivlp_jax` and `configs` must come from the installed
package (`pip install -e .`), not from the working directory. The tools start concurrently, one process
each: every one imports jax (and some TensorFlow), a few seconds apiece.

absl's `--help` prints the usage and exits with status 1 (absl.app.HelpFlag), so "it works" here means:
status 1, the usage text (the tool's docstring and flags) on stdout naming the tool's main flags, and no traceback. A tool that fails to
import exits 1 too, but prints a traceback and no usage.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
ABSL_HELP_STATUS = 1
TIMEOUT_S = 600

# Each documented Python entry point, as `-m module` or a script under the repo, and the flags its usage
# text must name.
ENTRY_POINTS = {
    'hivlp_jax.main': ['--config', '--workdir', '--mode', '--distributed', '--stop_after_step'],
    'hivlp_jax.query': ['--workdir', '--text', '--image', '--image_dir', '--k', '--backend', '--num_shards',
                        '--contact_sheet', '--html'],
    'hivlp_jax.data.convert_shards': ['--shards', '--out_dir', '--examples_per_file', '--overwrite'],
    'benchmarks/train_step.py': ['--config', '--steps', '--vocab_size', '--out', '--profile_steps'],
    'benchmarks/versus_open_clip.py': ['--rounds', '--steps', '--sides', '--open_clip_python', '--one_dim', '--out'],
    'benchmarks/retrieval.py': ['--sizes', '--dim', '--queries', '--methods', '--two_stage', '--threads',
                                '--repeats', '--from_workdir', '--out', '--plot'],
    'benchmarks/input_pipeline.py': ['--workers', '--processes', '--batches', '--out', '--baseline_checkout',
                                     '--rounds'],
    'benchmarks/ablations.py': ['--sweep', '--config', '--seeds', '--root', '--out', '--variants', '--extra'],
    'benchmarks/bad_inputs.py': ['--out_dir', '--only'],
    'benchmarks/eval_memory.py': ['--images', '--captions_per_image', '--dim', '--cases', '--out'],
    'benchmarks/gallery_eval.py': ['--images', '--queries', '--dim', '--two_stage', '--out'],
    'benchmarks/video_order.py': ['--workdirs', '--dims', '--out'],
    'benchmarks/cpu_collectives_in_flight.py': ['--limits', '--repeats', '--seconds', '--devices', '--busy_processes',
                                                '--train_config', '--train_steps', '--out'],
}
# Documented shell scripts: checked for syntax (`bash -n`; running them trains or needs a cluster), and
# every Python tool they start must be one of ENTRY_POINTS.
SHELL_SCRIPTS = ['launch/local.sh', 'launch/tpu_vm.sh', 'launch/slurm_gpu.sh', 'benchmarks/accelerator.sh']

README_MAIN_COMMAND = ('python3.11 -m venv .venv && .venv/bin/pip install -r requirements.txt -e . '
                       '&& launch/local.sh')
README_TEST_COMMAND = ('python3.11 -m venv .venv && .venv/bin/pip install -r requirements-test.txt -e . '
                       '&& .venv/bin/python -m pytest -q -n 2 --dist loadfile tests')


def _argv(entry_point: str) -> list[str]:
  if entry_point.endswith('.py'):
    return [sys.executable, str(REPO / entry_point), '--help']
  return [sys.executable, '-m', entry_point, '--help']


@pytest.fixture(scope='module')
def help_outputs(tmp_path_factory):
  """{entry point: (status, stdout, stderr)} of `--help`, all started at once in an empty directory."""
  cwd = tmp_path_factory.mktemp('elsewhere')
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  env.pop('PYTHONPATH', None)
  procs = {e: subprocess.Popen(_argv(e), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for e in ENTRY_POINTS}
  outputs = {}
  try:
    for entry_point, proc in procs.items():
      stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
      outputs[entry_point] = (proc.returncode, stdout, stderr)
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return outputs


@pytest.mark.parametrize('entry_point', sorted(ENTRY_POINTS))
def test_help_runs_from_another_directory(help_outputs, entry_point):
  status, stdout, stderr = help_outputs[entry_point]
  hint = ''
  if 'No module named' in stderr:
    hint = ' Is the package installed? pip install -r requirements-test.txt -e .'
  assert 'Traceback' not in stderr, f'{entry_point} --help failed.{hint}\n{stderr[-3000:]}'
  assert status == ABSL_HELP_STATUS, f'{entry_point} --help exited {status}.{hint}\n{stderr[-3000:]}'
  assert 'Try --helpfull' in stdout, stdout[-3000:]  # absl's last line after the usage text.
  # absl lists each flag as `  --name: help`, a boolean as `  --[no]name: help`.
  listed = {'--' + name for name in re.findall(r'^\s+--(?:\[no\])?(\w+):', stdout, flags=re.MULTILINE)}
  missing = [flag for flag in ENTRY_POINTS[entry_point] if flag not in listed]
  assert not missing, f'{entry_point} --help does not list {missing}:\n{stdout}'


@pytest.mark.parametrize('script', SHELL_SCRIPTS)
def test_shell_scripts_parse_and_start_documented_tools(script):
  path = REPO / script
  result = subprocess.run(['bash', '-n', str(path)], capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  text = path.read_text()
  started = set(re.findall(r'-m (hivlp_jax\.\w+)', text)) | set(re.findall(r'(benchmarks/\w+\.py)', text))
  assert started <= set(ENTRY_POINTS), f'{script} starts {sorted(started - set(ENTRY_POINTS))}'


def _docs() -> dict[str, str]:
  pages = [REPO / 'README.md'] + sorted((REPO / 'docs').glob('*.md'))
  return {str(p.relative_to(REPO)): p.read_text() for p in pages}


def test_docs_name_only_covered_commands():
  """The README and docs/*.md name no tool this file does not run, and none that does not exist."""
  covered = set(ENTRY_POINTS) | set(SHELL_SCRIPTS)
  for page, text in _docs().items():
    named = (set(re.findall(r'-m (hivlp_jax(?:\.\w+)+)', text))
             | set(re.findall(r'\b((?:benchmarks|launch)/\w+\.(?:py|sh))\b', text)))
    assert named <= covered, f'{page} names {sorted(named - covered)}, which this test does not run'
  for entry_point in covered:
    path = REPO / (entry_point if '/' in entry_point else entry_point.replace('.', '/') + '.py')
    assert path.is_file(), f'{entry_point} is documented but {path.relative_to(REPO)} does not exist'


def test_readme_commands_and_ci():
  readme = (REPO / 'README.md').read_text()
  assert README_MAIN_COMMAND in readme
  assert README_TEST_COMMAND in readme
  ci = (REPO / '.ci' / 'run').read_text().splitlines()
  assert README_TEST_COMMAND in ci, '.ci/run must run exactly the README test command'
