"""Losses equal plain numpy computations of their definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hivlp_jax import losses


def _normalise(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def numpy_info_nce(image, text, temperature):
  """(i2t + t2i) / 2 with positives on the diagonal, written out plainly."""
  logits = image @ text.T / temperature
  def ce(rows):
    total = 0.0
    for i, row in enumerate(rows):
      total += np.log(np.sum(np.exp(row - row.max()))) + row.max() - row[i]
    return total / len(rows)
  return (ce(logits) + ce(logits.T)) / 2


def _in_batch(image, text, temperature, dims=None, weights=None):
  """The contrastive loss with in-batch negatives on one device (no axis): keys are the batch itself."""
  dims = dims or (image.shape[1],)
  weights = weights or (1.0,) * len(dims)
  pair = losses.Pair(np.asarray(image, np.float32), np.asarray(text, np.float32))
  return losses.contrastive_loss(pair, pair, pair, temperature, dims, weights)


def test_in_batch_contrastive_loss_equals_numpy():
  rng = np.random.default_rng(0)
  image, text = _normalise(rng.normal(size=(8, 16))), _normalise(rng.normal(size=(8, 16)))
  loss, metrics = _in_batch(image, text, 0.1)
  np.testing.assert_allclose(loss, numpy_info_nce(image, text, 0.1), rtol=1e-5)
  assert 0.0 <= metrics['accuracy_i2t_dim16'] <= 1.0


def test_local_rows_against_global_batch_average_to_the_global_loss():
  """Each device's rows against the gathered batch, averaged over devices, is the one-device loss."""
  rng = np.random.default_rng(1)
  image, text = _normalise(rng.normal(size=(12, 8))), _normalise(rng.normal(size=(12, 8)))
  pair = losses.Pair(jnp.asarray(image, jnp.float32), jnp.asarray(text, jnp.float32))

  def device_loss(local_image, local_text):
    local = losses.Pair(local_image, local_text)
    return losses.contrastive_loss(local, pair, pair, 0.05, (8,), (1.0,), axis_name='batch')[0]

  per_device = jax.pmap(device_loss, 'batch')(pair.image.reshape(4, 3, 8), pair.text.reshape(4, 3, 8))
  np.testing.assert_allclose(np.mean(per_device), numpy_info_nce(image, text, 0.05), rtol=1e-5)


def test_matryoshka_loss_is_weighted_sum_over_renormalised_prefixes():
  rng = np.random.default_rng(2)
  image, text = rng.normal(size=(6, 32)), rng.normal(size=(6, 32))
  dims, weights = (4, 8, 32), (0.5, 1.0, 2.0)
  total, metrics = _in_batch(image, text, 0.07, dims, weights)
  expected = [numpy_info_nce(_normalise(image[:, :d]), _normalise(text[:, :d]), 0.07) for d in dims]
  np.testing.assert_allclose(total, sum(w * e for w, e in zip(weights, expected)), rtol=1e-5)
  for d, e in zip(dims, expected):
    np.testing.assert_allclose(metrics[f'loss_dim{d}'], e, rtol=1e-5)


def test_perfect_alignment_gives_low_loss_and_full_accuracy():
  image = _normalise(np.eye(8) * 3 + 0.01)
  loss, metrics = _in_batch(image, image, 0.01)
  assert loss < 1e-3
  assert metrics['accuracy_i2t_dim8'] == 1.0 and metrics['accuracy_t2i_dim8'] == 1.0


@pytest.mark.parametrize('temperature', [0.01, 1.0])
def test_contrastive_loss_is_stable_for_large_logits(temperature):
  """Similarities of +-1 at temperature 0.01 give logits of 100: the loss stays finite and near 0."""
  image = np.array([[1.0, 0.0], [0.0, 1.0]])
  loss, _ = _in_batch(image, image, temperature)
  assert np.isfinite(loss)
  np.testing.assert_allclose(loss, numpy_info_nce(image, image, temperature), rtol=1e-5, atol=1e-6)
