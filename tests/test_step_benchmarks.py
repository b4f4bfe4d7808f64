"""benchmarks/train_step.py's time-by-component profile, and how versus_open_clip.py compares the sides."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from hivlp_jax import host_memory
from tests import conftest

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_train_step_profile_attributes_op_time_to_model_components(tmp_path):
  out = tmp_path / 'step.jsonl'
  env = dict(os.environ, XLA_FLAGS=conftest.xla_flags(1))
  subprocess.run([sys.executable, 'benchmarks/train_step.py', '--config=configs/tiny.py', '--steps=1',
                  '--warmup_steps=1', '--profile_steps=2', f'--out={out}'], cwd=REPO, env=env, check=True,
                 capture_output=True, timeout=600)
  result = json.loads(out.read_text())
  by_component = result['op_ms_per_step_by_component']
  # Every part of the step is found, forward and backward, so the table says where the time goes.
  for name in ('attention projections', 'attention core (QK, softmax, AV)', 'MLP matmuls', 'MLP GELU',
               'layer norms'):
    for direction in ('forward', 'backward'):
      assert by_component[f'{name}, {direction}'] > 0, (name, direction, by_component)
  assert by_component['loss'] > 0 and by_component['optimizer and step bookkeeping'] > 0
  # Op time is per step: one step's ops cannot take more than the threads could run in the timed steps' span.
  assert sum(by_component.values()) / 1e3 < 4 * max(1, os.cpu_count()) * result['p90_step_s']


@pytest.fixture(scope='module')
def versus():
  spec = importlib.util.spec_from_file_location('versus_open_clip', REPO / 'benchmarks' / 'versus_open_clip.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_versus_open_clip_takes_each_rounds_best_sides(versus):
  rounds = [{'jax_1_device': {'median_step_s': 1.0}, 'jax_2_devices': {'median_step_s': 0.8},
             'open_clip': {'median_step_s': 1.2}, 'open_clip_compiled': {'median_step_s': 0.96}},
            {'jax_1_device': {'median_step_s': 0.9}, 'jax_2_devices': {'median_step_s': 1.0},
             'open_clip': {'median_step_s': 0.9}, 'open_clip_compiled': {'median_step_s': 1.35}},
            {'jax_1_device': {'median_step_s': 2.0}, 'jax_2_devices': {'median_step_s': 2.0},
             'open_clip': {'median_step_s': 1.0}, 'open_clip_compiled': {'median_step_s': 1.1}}]
  summary = versus.summarise(rounds)
  # Per round: open_clip's best over this project's best (0.96 / 0.8, 0.9 / 0.9, 1.0 / 2.0), not a median of sides.
  assert summary['speedup_per_round'] == pytest.approx([1.2, 1.0, 0.5])
  assert summary['speedup_median'] == pytest.approx(1.0)
  assert summary['speedup_range'] == pytest.approx([0.5, 1.2])
  assert summary['median_step_s']['open_clip_compiled'] == pytest.approx(1.1)
  assert summary['examples_per_s']['jax_2_devices'] == pytest.approx(versus.BATCH / 1.0)
  assert '1.00x (range 0.50-1.20x over 3 rounds)' in versus.table(summary, rounds)


def test_versus_open_clip_matches_the_shapes_on_both_sides(versus):
  """This project's side trains the shapes open_clip's side builds: the overrides name each of them."""
  overrides = dict(o.removeprefix('--config.').split('=', 1) for o in versus.jax_overrides(one_dim=False))
  for tower in ('image', 'text'):
    assert overrides[f'model.{tower}.width'] == '192' and overrides[f'model.{tower}.depth'] == '4'
    assert overrides[f'model.{tower}.num_heads'] == '3' and overrides[f'model.{tower}.mlp_dim'] == '768'
  assert (overrides['model.image.patch_size'], overrides['model.image_size'], overrides['model.text.max_len'],
          overrides['model.embed_dim'], overrides['batch_size']) == ('8', '32', '32', '256', '256')
  one_dim = dict(o.removeprefix('--config.').split('=', 1) for o in versus.jax_overrides(one_dim=True))
  assert one_dim['model.nested_dims'] == '(256,)' and 'model.nested_dims' not in overrides


def test_with_hugepages_keeps_other_tunables_and_toggles_its_own():
  env = {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0', 'PATH': '/bin'}
  on = host_memory.with_hugepages(env)
  assert on == {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1', 'PATH': '/bin'}
  assert host_memory.with_hugepages(on) == on  # Idempotent.
  assert host_memory.with_hugepages(on, enabled=False)['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2'
  assert host_memory.with_hugepages({})['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'


THP_MODE = pathlib.Path('/sys/kernel/mm/transparent_hugepage/enabled')


@pytest.mark.skipif(not THP_MODE.exists() or '[never]' in THP_MODE.read_text(),
                    reason='transparent huge pages are off in this kernel: the tunable cannot act')
def test_hugepages_cut_the_page_faults_of_fresh_large_blocks():
  """The reason launch/local.sh sets it: memory mapped afresh faults once per 2 MB, not once per 4 KB."""
  # malloc + memset through ctypes, like XLA's buffers (numpy madvises its own large arrays into huge pages).
  child = ('import ctypes, resource\n'
           'libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p\n'
           'libc.memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)\n'
           'libc.free.argtypes = (ctypes.c_void_p,)\n'
           'before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n'
           'for _ in range(8):  # 64 MB, written, freed (unmapped) again at once, like a step temporary\n'
           '  block = libc.malloc(64 << 20); libc.memset(block, 1, 64 << 20); libc.free(block)\n'
           'print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n')
  faults = {}
  for enabled in (False, True):
    run = subprocess.run([sys.executable, '-c', child], env=host_memory.with_hugepages(os.environ, enabled),
                         capture_output=True, text=True, check=True, timeout=120)
    faults[enabled] = int(run.stdout)
  assert faults[False] > 8 * 16_000 * 0.9  # 4 KB pages: 16,384 faults per 64 MB block.
  assert faults[True] < faults[False] / 10, faults


def test_collectives_benchmark_loops_a_bounded_pmapped_step_and_records_each_try(tmp_path):
  out = tmp_path / 'in_flight.json'
  subprocess.run([sys.executable, 'benchmarks/cpu_collectives_in_flight.py', '--limits=1', '--repeats=1',
                  '--seconds=3', '--busy_processes=0', '--devices=2', f'--out={out}'], cwd=REPO, check=True,
                 capture_output=True, timeout=600)
  [attempt] = json.loads(out.read_text())['tries']
  assert attempt['limit'] == 1 and attempt['completed'] and attempt['returncode'] == 0
  assert not attempt['collective_timeout'] and attempt['steps_before_end'] >= 20
