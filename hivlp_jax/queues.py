"""Sharded momentum queues and the softmax over [global batch, queue] they need (MoCo/ALBEF/COTS).

The queues hold momentum embeddings of earlier pairs: slot k of the image queue and slot k of the text
queue always come from the same pair, so image-to-text and text-to-image distributions over the queues
share a support (the COTS task-level alignment relies on it). Embeddings are stored at the full embed dim,
unnormalised, as the heads produce them; a nested dim reads a prefix and re-normalises it.

Layout. Under `jax.pmap` each of the n devices holds S = Q / n slots (Q = the queue size, a multiple of the
global batch B = n * b). Each step every device writes the momentum embeddings of its own b pairs into its
own shard, at the same local slot, so the queue is never all-gathered: only the small global query batch
is. Device i of the pmap axis (over every device of every process) holds slots [i * S, (i + 1) * S) of the
whole queue [Q, D]. Each process holds only its devices' shards; checkpoints store the whole queue as one
global array sharded the same way (`shards_to_global`), which orbax writes and reads shard by shard on each
process, so no process ever holds the whole queue.

Softmax. A query row's support is split in two parts (see `Logits`): columns every device holds in full
(the gathered momentum batch, computed for this device's rows only) and this device's queue slots (computed
for every row of the gathered global batch). `logsumexp`, `expectation` and `kl_divergence` combine the
shards with collectives (pmax of the local maxima, psum of the exp-sums, reduce-scattered to the rows'
devices), so their values and gradients equal those of one device holding the whole queue.
"""

import functools
from typing import NamedTuple, Optional, Sequence

import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from hivlp_jax import errors

# Logit of an empty slot: exp() of it underflows to exactly 0, and it stays finite, so gradients do too.
EMPTY_SLOT_LOGIT = -1e9


@flax.struct.dataclass
class QueueState:
  """Index-aligned image and text queues. S = Q on the host, Q / n on each device."""
  image: jnp.ndarray  # [S, D] float32, momentum image embeddings.
  text: jnp.ndarray  # [S, D] float32, momentum text embeddings of the same pairs.
  filled: jnp.ndarray  # [S] bool: the slot holds a pair (empty slots are left out of every softmax).
  # 0-d int32, the ring pointer in global units: pairs written since the ring last wrapped (a multiple of
  # the global batch). Each device writes its b rows at local slot position / n.
  position: jnp.ndarray
  # [S] int32, the image id of each slot's pair (config.contrastive.image_id_positives); None when off.
  image_ids: Optional[jnp.ndarray] = None

  def map_slots(self, fn) -> 'QueueState':
    """`fn` applied to every per-slot array (not the pointer): image, text, filled and image_ids."""
    return self.replace(image=fn(self.image), text=fn(self.text), filled=fn(self.filled),
                        image_ids=None if self.image_ids is None else fn(self.image_ids))


def init(queue_size: int, embed_dim: int, image_ids: bool = False) -> QueueState:
  """Empty host queues of `queue_size` pairs at the full embedding dim (and their image ids, if asked)."""
  return QueueState(image=jnp.zeros((queue_size, embed_dim), jnp.float32),
                    text=jnp.zeros((queue_size, embed_dim), jnp.float32),
                    filled=jnp.zeros((queue_size,), jnp.bool_),
                    position=jnp.zeros((), jnp.int32),
                    image_ids=jnp.full((queue_size,), -1, jnp.int32) if image_ids else None)


def pmap_device_order(local_devices: Sequence[jax.Device]) -> list[jax.Device]:
  """Every device of a pmap over `local_devices` (on every process), in the order of its axis index.

  One process: `local_devices` themselves. Several: each process pmaps over all its local devices, and the
  axis order is asked of pmap itself and shared between the processes (collective: call on every process).
  """
  if jax.process_count() == 1:
    return list(local_devices)
  return list(_multi_process_device_order(tuple(local_devices)))


@functools.lru_cache
def _multi_process_device_order(local_devices: tuple[jax.Device, ...]) -> tuple[jax.Device, ...]:
  if list(local_devices) != jax.local_devices():
    raise errors.InputError('A multi-process pmap runs over all local devices: pass jax.local_devices().')
  axis_index = jax.pmap(lambda _: jax.lax.axis_index('i'), axis_name='i')(np.zeros(len(local_devices)))
  pairs = np.stack([np.asarray(axis_index), [d.id for d in local_devices]], axis=1).astype(np.int64)
  pairs = np.asarray(multihost_utils.process_allgather(pairs, tiled=True))  # [n, 2] over all processes.
  by_id = {d.id: d for d in jax.devices()}
  return tuple(by_id[int(device_id)] for _, device_id in sorted(pairs.tolist()))


def _global_sharding(device_order: Sequence[jax.Device], ndim: int) -> jax.sharding.NamedSharding:
  mesh = jax.sharding.Mesh(np.array(device_order), ('slots',))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('slots', *(None,) * (ndim - 1)))


def host_to_global(queues: QueueState, device_order: Sequence[jax.Device]) -> QueueState:
  """Host queues [Q, ...] (the same on every process) -> global arrays [Q, ...] split over `device_order`.

  Each process places only its own devices' slots. The pointer stays a host 0-d array.
  """
  def to_global(leaf):
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, _global_sharding(device_order, host.ndim),
                                        lambda index: host[index])
  return queues.map_slots(to_global).replace(position=np.asarray(queues.position, np.int32))


def global_to_shards(queues: QueueState, local_devices: Sequence[jax.Device],
                     device_order: Sequence[jax.Device], axis_name: str) -> QueueState:
  """Queues [Q, ...] -> pmap layout on `local_devices`: [n_local, S, ...], one slot range per device.

  `queues` holds global arrays split over `device_order` (as `host_to_global` or a checkpoint restore makes
  them: each device's shard is used where it is) or host arrays (sliced by each device's axis index).
  """
  axis_index = {d: i for i, d in enumerate(device_order)}
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(local_devices), (axis_name,)),
                                        jax.sharding.PartitionSpec(axis_name))

  def stack(pieces):  # One [...] array per local device -> [n_local, ...] in the pmap layout.
    return jax.make_array_from_single_device_arrays((len(pieces),) + pieces[0].shape, sharding,
                                                    [piece[None] for piece in pieces])

  def to_shards(leaf):
    if isinstance(leaf, jax.Array) and len(leaf.sharding.device_set) > 1:
      by_device = {shard.device: shard.data for shard in leaf.addressable_shards}
      return stack([by_device[d] for d in local_devices])
    host = np.asarray(leaf)
    if len(host) % len(device_order):
      raise errors.InputError(f'A queue of {len(host)} pairs cannot be split over {len(device_order)} devices evenly.')
    size = len(host) // len(device_order)
    return stack([jax.device_put(host[axis_index[d] * size:(axis_index[d] + 1) * size], d) for d in local_devices])
  position = np.asarray(queues.position, np.int32)
  return queues.map_slots(to_shards).replace(position=stack([jax.device_put(position, d) for d in local_devices]))


def shards_to_global(queues: QueueState, device_order: Sequence[jax.Device]) -> QueueState:
  """Inverse of `global_to_shards`: pmap layout [n_local, S, ...] -> global arrays [Q, ...] (for orbax).

  No data moves: each device's shard becomes its slot range of the global array.
  """
  def to_global(leaf):
    shards = [shard.data.reshape(shard.data.shape[1:]) for shard in leaf.addressable_shards]
    shape = (len(device_order) * leaf.shape[1],) + leaf.shape[2:]
    return jax.make_array_from_single_device_arrays(shape, _global_sharding(device_order, len(shape)), shards)
  return queues.map_slots(to_global).replace(
      position=np.asarray(jax.device_get(queues.position.addressable_shards[0].data)).reshape(()))


def enqueue(queues: QueueState, image_keys: jnp.ndarray, text_keys: jnp.ndarray, keep: jnp.ndarray,
            axis_name: str, image_ids: Optional[jnp.ndarray] = None) -> QueueState:
  """Writes this device's pairs into its shard at the ring pointer; call under pmap.

  Args:
    queues: this device's shard, S slots.
    image_keys, text_keys: [b, D] momentum embeddings of this device's pairs (full dim).
    keep: [b] bool. A pair that is not kept (filtered as noisy) is not enqueued: its slot keeps the pair
      it held before (or stays empty), so slot k of both queues still holds one and the same pair.
    image_ids: [b] int32, the pairs' image ids; needed when the queues keep them.
  Returns the updated shard; the pointer advances by the global batch, wrapping at Q.
  """
  local_batch = image_keys.shape[0]
  num_devices = jax.lax.axis_size(axis_name)
  start = queues.position // num_devices

  def write(queue, rows):
    old = jax.lax.dynamic_slice_in_dim(queue, start, local_batch)
    mask = keep.reshape((-1,) + (1,) * (rows.ndim - 1))
    return jax.lax.dynamic_update_slice_in_dim(queue, jnp.where(mask, rows.astype(queue.dtype), old), start, 0)

  filled = jax.lax.dynamic_slice_in_dim(queues.filled, start, local_batch) | keep
  queue_size = queues.image.shape[0] * num_devices
  return QueueState(image=write(queues.image, jax.lax.stop_gradient(image_keys)),
                    text=write(queues.text, jax.lax.stop_gradient(text_keys)),
                    filled=jax.lax.dynamic_update_slice_in_dim(queues.filled, filled, start, 0),
                    position=(queues.position + num_devices * local_batch) % queue_size,
                    image_ids=None if queues.image_ids is None else write(queues.image_ids, image_ids))


def queue_logits(queries: jnp.ndarray, queue: jnp.ndarray, filled: jnp.ndarray,
                 temperature: jnp.ndarray) -> jnp.ndarray:
  """Normalised queries [B, d] against a normalised queue shard [S, d] -> [B, S]; empty slots get -1e9."""
  return jnp.where(filled[None, :], queries @ queue.T / temperature, EMPTY_SLOT_LOGIT)


class Logits(NamedTuple):
  """Logits of this device's b query rows over a support split between the devices.

  batch: [b, K], columns that every device holds in full (e.g. the gathered momentum batch), for this
    device's rows only.
  queue: [B, S], every row of the gathered global batch (B = n * b, device-major, this device's rows at
    axis_index * b) against this device's S queue slots. The other devices hold the other slots.
  """
  batch: jnp.ndarray
  queue: jnp.ndarray


def _own_rows(x: jnp.ndarray, local_batch: int, axis_name: str) -> jnp.ndarray:
  """[B, ...] replicated over devices -> this device's rows [b, ...]."""
  return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(axis_name) * local_batch, local_batch)


def _sum_over_shards(per_row: jnp.ndarray, axis_name: str) -> jnp.ndarray:
  """[B] partial sums over this device's slots -> [b] sums over every device's slots, for this device's rows."""
  return jax.lax.psum_scatter(per_row, axis_name, scatter_dimension=0, tiled=True)


def row_max(logits: Logits, axis_name: str) -> jnp.ndarray:
  """[b]: the largest logit of each of this device's rows over the whole support (no gradient)."""
  local_batch = logits.batch.shape[0]
  queue_max = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits.queue, axis=1)), axis_name)  # [B]
  batch_max = jax.lax.stop_gradient(jnp.max(logits.batch, axis=1))
  return jnp.maximum(batch_max, _own_rows(queue_max, local_batch, axis_name))


def logsumexp(logits: Logits, axis_name: str) -> jnp.ndarray:
  """[b]: log sum exp of each of this device's rows over [batch columns, the whole queue]."""
  local_batch = logits.batch.shape[0]
  # The shifts only keep exp() in range; they carry no gradient, so any value gives the exact result.
  queue_max = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits.queue, axis=1)), axis_name)  # [B]
  queue_sum = _sum_over_shards(jnp.sum(jnp.exp(logits.queue - queue_max[:, None]), axis=1), axis_name)
  queue_max = _own_rows(queue_max, local_batch, axis_name)
  shift = jnp.maximum(jax.lax.stop_gradient(jnp.max(logits.batch, axis=1)), queue_max)
  total = jnp.sum(jnp.exp(logits.batch - shift[:, None]), axis=1) + queue_sum * jnp.exp(queue_max - shift)
  return shift + jnp.log(total)


def expectation(weight_logits: Logits, values: Logits, axis_name: str,
                weight_logsumexp: jnp.ndarray | None = None) -> jnp.ndarray:
  """[b]: sum_k softmax(weight_logits)_k * values_k over the whole support, for this device's rows.

  `values` has the layout of `weight_logits`; `weight_logsumexp` ([b], optional) saves recomputing it.
  """
  if weight_logsumexp is None:
    weight_logsumexp = logsumexp(weight_logits, axis_name)
  all_rows_logsumexp = jax.lax.all_gather(weight_logsumexp, axis_name, tiled=True)  # [B]
  batch_part = jnp.sum(jnp.exp(weight_logits.batch - weight_logsumexp[:, None]) * values.batch, axis=1)
  queue_part = _sum_over_shards(
      jnp.sum(jnp.exp(weight_logits.queue - all_rows_logsumexp[:, None]) * values.queue, axis=1), axis_name)
  return batch_part + queue_part


def kl_divergence(p_logits: Logits, q_logits: Logits, axis_name: str) -> jnp.ndarray:
  """[b]: KL(softmax(p) || softmax(q)) per row, over a support that p and q share column by column.

  KL(p || q) = sum_k p_k (p_logit_k - q_logit_k) - logsumexp(p) + logsumexp(q).
  """
  p_logsumexp = logsumexp(p_logits, axis_name)
  difference = jax.tree.map(jnp.subtract, p_logits, q_logits)
  return (expectation(p_logits, difference, axis_name, p_logsumexp) - p_logsumexp
          + logsumexp(q_logits, axis_name))
