"""A bound on how many pmapped train steps are queued at once, so XLA's CPU collectives do not deadlock.

On the CPU backend every simulated device runs its part of a pmapped step on XLA's thread pools, and a
collective (all_gather, psum) waits in a pool worker until every device has arrived. With many steps
queued, some devices never arrive: XLA aborts after 40 s ("Termination timeout for all gather ...
exceeded"); a longer timeout only hangs longer, with every pool thread asleep. XLA's CPU client means to
run one collective launch at a time; why that does not prevent this is not known (an XLA bug, it seems).
`benchmarks/cpu_collectives_in_flight.py` shows it: with unbounded dispatch a small pmapped all_gather step
aborted within its first 40 steps on a loaded 2-core machine in every try; with one or two steps in flight
no try aborted (60-100 s each). Accelerators run their collectives on device streams, not on these pools,
so they keep two steps queued: the next is dispatched while one runs.

Use: fetch the next batch (host work overlaps the running step), `wait()`, dispatch, `add(metrics)`.
"""

import collections

import jax


def default_limit() -> int:
  """1 on the CPU backend (its collectives deadlock with more; see above), 2 on accelerators."""
  return 1 if jax.default_backend() == 'cpu' else 2


class StepsInFlight:
  """Blocks before a dispatch until fewer than `limit` of the dispatched steps are unfinished."""

  def __init__(self, limit: int | None = None):
    self.limit = default_limit() if limit is None else limit
    if self.limit < 1:
      raise ValueError(f'StepsInFlight(limit={limit}): the limit must be at least 1.')
    self._outputs = collections.deque()

  def wait(self):
    """Returns once fewer than `limit` steps are unfinished; call right before dispatching the next."""
    while len(self._outputs) >= self.limit:
      jax.block_until_ready(self._outputs.popleft())

  def add(self, outputs):
    """Records a just-dispatched step by outputs it does not donate (its metrics), to wait on later."""
    self._outputs.append(outputs)
