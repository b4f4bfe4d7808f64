"""The bound on queued pmapped steps that keeps XLA's CPU collectives from deadlocking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hivlp_jax import steps_in_flight


def _slow_pmapped_step():
  """A pmapped step with an all_gather that takes a while (tens of ms) on the CPU."""
  def step(x):
    for _ in range(6):
      x = jnp.tanh(x @ x.T @ x / x.shape[0])
    return jax.lax.all_gather(x, 'd').sum(0)
  return jax.pmap(step, axis_name='d')


class RecordingStepsInFlight(steps_in_flight.StepsInFlight):
  """Checks, after each wait, that at most limit - 1 of the added steps are unfinished."""
  instances = []

  def __init__(self, limit=None):
    super().__init__(limit)
    self.added, self.unfinished_after_wait = [], []
    RecordingStepsInFlight.instances.append(self)

  def wait(self):
    super().wait()
    self.unfinished_after_wait.append(
        sum(not all(x.is_ready() for x in jax.tree.leaves(outputs)) for outputs in self.added))

  def add(self, outputs):
    super().add(outputs)
    self.added.append(outputs)


@pytest.mark.parametrize('limit', [1, 2])
def test_wait_returns_only_when_fewer_than_limit_steps_are_unfinished(limit):
  step = _slow_pmapped_step()
  x = np.random.default_rng(0).normal(size=(jax.local_device_count(), 512, 512)).astype(np.float32)
  step(x).block_until_ready()  # Compiled.
  in_flight = RecordingStepsInFlight(limit)
  for _ in range(5):
    in_flight.wait()
    in_flight.add(step(x))
  assert max(in_flight.unfinished_after_wait) <= limit - 1, in_flight.unfinished_after_wait


def test_the_cpu_backend_keeps_one_step_in_flight_and_a_bad_limit_is_named():
  assert jax.default_backend() == 'cpu' and steps_in_flight.default_limit() == 1
  assert steps_in_flight.StepsInFlight().limit == 1
  with pytest.raises(ValueError, match='limit=0'):
    steps_in_flight.StepsInFlight(0)
