"""Nested heads: one vector read at several normalised prefix lengths."""

import jax
import numpy as np
import pytest

from hivlp_jax.models import matryoshka


def test_nested_embeddings_are_normalised_prefixes_of_one_projection():
  head = matryoshka.NestedProjection(embed_dim=32)
  pooled = np.random.default_rng(0).normal(size=(5, 12)).astype(np.float32)
  params = head.init(jax.random.key(0), pooled)
  full = np.asarray(head.apply(params, pooled))
  assert full.shape == (5, 32)
  for dim in (4, 8, 16, 32):
    prefix = np.asarray(matryoshka.normalized_prefix(full, dim))
    np.testing.assert_allclose(np.linalg.norm(prefix, axis=1), 1.0, rtol=1e-5)
    # Same direction as the first `dim` coordinates of the full vector.
    np.testing.assert_allclose(prefix * np.linalg.norm(full[:, :dim], axis=1, keepdims=True), full[:, :dim],
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('dims, message', [
    ((32, 16), 'strictly increasing'),
    ((16, 16), 'strictly increasing'),
    ((16, 512), 'larger than the head'),
    ((), 'empty'),
])
def test_bad_nested_dims_are_named(dims, message):
  with pytest.raises(ValueError, match=message):
    matryoshka.validate_dims(dims, embed_dim=256)
