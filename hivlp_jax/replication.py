"""The pmap layout of a train state: replicated on every local device, except the negative queues, sharded.

A host state (numpy or global arrays) goes in with `replicate_state`, comes out with `unreplicate_state`
(for checkpoints: the queues become one global array sharded over every device, so no process gathers them).
"""

import flax
import jax
import numpy as np

from hivlp_jax import queues

AXIS = 'batch'  # The one pmap axis: data parallelism over every device of every process.


def unreplicate(tree):
  """First replica of a pmapped pytree, as host numpy arrays.

  Host arrays, because orbax cannot save the host-local arrays of a multi-process pmap, and
  flax.jax_utils.unreplicate keeps a leading axis on one device.
  """
  return jax.tree.map(lambda x: np.asarray(x[0]), tree)


def replicate(tree, devices=None):
  """A host pytree copied to every one of `devices` (default: the local ones), in the step's output layout."""
  # Named like the pmap axis, the layout equals that of the step's outputs: one compile, not two.
  return flax.jax_utils.replicate(tree, devices or jax.local_devices(), axis_name=AXIS)


def replicate_state(state, devices=None):
  """Host state -> pmap layout on `devices`: replicated, except `negative_queues`, split into shards.

  The queues may be host arrays [Q, D] or global arrays (as `unreplicate_state` and a restore give them).
  """
  devices = devices or jax.local_devices()
  replicated = replicate(state.replace(negative_queues=None), devices)
  if state.negative_queues is None:
    return replicated
  shards = queues.global_to_shards(state.negative_queues, devices, queues.pmap_device_order(devices), AXIS)
  return replicated.replace(negative_queues=shards)


def unreplicate_state(state):
  """Inverse of `replicate_state`: the first replica as host arrays, with the queues as global arrays.

  The queues stay sharded where they are (every process holds its devices' slots): orbax saves them so.
  """
  host = unreplicate(state.replace(negative_queues=None))
  if state.negative_queues is None:
    return host
  shards = sorted(state.negative_queues.image.addressable_shards, key=lambda shard: shard.index[0].start)
  device_order = queues.pmap_device_order([shard.device for shard in shards])
  return host.replace(negative_queues=queues.shards_to_global(state.negative_queues, device_order))


def with_global_queues(state):
  """Host state whose queues become global arrays: the restore target orbax needs to read them sharded."""
  if state.negative_queues is None:
    return state
  return state.replace(negative_queues=queues.host_to_global(state.negative_queues,
                                                             queues.pmap_device_order(jax.local_devices())))
