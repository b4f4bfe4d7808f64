"""Huge pages for malloc on CPU hosts: the environment variable `HIVLP_HUGEPAGES=1 launch/local.sh` sets.

XLA's CPU runtime maps fresh memory for a step's temporaries on every call. In 4 KB pages that is about
275,000 minor page faults per step of a 3.9M-parameter two-tower model; with glibc backing its large blocks
by transparent huge pages (glibc >= 2.35 reads `glibc.malloc.hugetlb=1` from GLIBC_TUNABLES at process
start; older ones ignore it), one fault per 2 MB, and the step runs 1.44x faster (docs/results.md). glibc
reads the variable only when a process starts, so it is set for child processes, not the current one.

Opt-in (`HIVLP_HUGEPAGES=1 launch/local.sh`), not the default: with it set for the whole test suite, one
run lost an xdist worker to a SIGABRT inside a pmapped train step (test_train.py). That abort is not theirs:
XLA's CPU collectives deadlock when several pmapped steps are queued, with or without huge pages, and the
training loop now keeps one step in flight on the CPU (hivlp_jax/steps_in_flight.py, docs/results.md).
"""

from typing import Mapping

HUGEPAGES_TUNABLE = 'glibc.malloc.hugetlb=1'


def with_hugepages(env: Mapping[str, str], enabled: bool = True) -> dict[str, str]:
  """A copy of `env` whose GLIBC_TUNABLES asks for huge pages (or, `enabled=False`, does not); other
  tunables are kept."""
  tunables = [t for t in env.get('GLIBC_TUNABLES', '').split(':') if t and not t.startswith('glibc.malloc.hugetlb')]
  return {**env, 'GLIBC_TUNABLES': ':'.join(tunables + ([HUGEPAGES_TUNABLE] if enabled else []))}
