"""Loading a ViT `.npz` checkpoint of the public layout into the image tower."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hivlp_jax.models import pretrained
from hivlp_jax.models import two_towers


def _checkpoint(rng, width=64, heads=2, mlp=128, depth=2, patch=8, grid=2):
  """Arrays named and shaped as in the public ViT .npz files (a tiny size)."""
  head_dim = width // heads
  arrays = {
      'embedding/kernel': (patch, patch, 3, width), 'embedding/bias': (width,), 'cls': (1, 1, width),
      'Transformer/posembed_input/pos_embedding': (1, 1 + grid * grid, width),
      'Transformer/encoder_norm/scale': (width,), 'Transformer/encoder_norm/bias': (width,),
      'head/kernel': (width, 1000), 'head/bias': (1000,),
  }
  for i in range(depth):
    block = f'Transformer/encoderblock_{i}'
    for norm in ('LayerNorm_0', 'LayerNorm_2'):
      arrays.update({f'{block}/{norm}/scale': (width,), f'{block}/{norm}/bias': (width,)})
    for proj in ('query', 'key', 'value'):
      arrays.update({f'{block}/MultiHeadDotProductAttention_1/{proj}/kernel': (width, heads, head_dim),
                     f'{block}/MultiHeadDotProductAttention_1/{proj}/bias': (heads, head_dim)})
    arrays.update({f'{block}/MultiHeadDotProductAttention_1/out/kernel': (heads, head_dim, width),
                   f'{block}/MultiHeadDotProductAttention_1/out/bias': (width,),
                   f'{block}/MlpBlock_3/Dense_0/kernel': (width, mlp), f'{block}/MlpBlock_3/Dense_0/bias': (mlp,),
                   f'{block}/MlpBlock_3/Dense_1/kernel': (mlp, width), f'{block}/MlpBlock_3/Dense_1/bias': (width,)})
  return {name: rng.normal(size=shape).astype(np.float32) for name, shape in arrays.items()}


def _vit_params(width=64):
  vit = two_towers.ViT(patch_size=8, width=width, depth=2, num_heads=2, mlp_dim=128)
  return vit, vit.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']


def test_vit_npz_loads_every_tower_parameter_and_resizes_position_embeddings(tmp_path):
  checkpoint = _checkpoint(np.random.default_rng(0))
  np.savez(tmp_path / 'vit.npz', **checkpoint)
  vit, params = _vit_params()
  loaded, report = pretrained.load_vit_npz(str(tmp_path / 'vit.npz'), params)
  assert report.left_new == [] and sorted(report.unused) == ['head/bias', 'head/kernel']
  assert report.reshaped == ['pos_embedding (1, 5, 64) -> (1, 17, 64)']
  np.testing.assert_array_equal(loaded['patch_embed']['kernel'], checkpoint['embedding/kernel'])
  block = loaded['encoder']['block1']
  np.testing.assert_array_equal(block['MultiHeadDotProductAttention_0']['out']['kernel'],
                                checkpoint['Transformer/encoderblock_1/MultiHeadDotProductAttention_1/out/kernel'])
  np.testing.assert_array_equal(block['MlpBlock_0']['Dense_1']['bias'],
                                checkpoint['Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias'])
  np.testing.assert_array_equal(block['LayerNorm_1']['scale'],
                                checkpoint['Transformer/encoderblock_1/LayerNorm_2/scale'])
  posemb = loaded['pos_embedding']
  np.testing.assert_array_equal(posemb[:, 0], checkpoint['Transformer/posembed_input/pos_embedding'][:, 0])
  # A constant grid stays constant under bilinear resizing.
  constant = np.ones((1, 5, 3), np.float32)
  np.testing.assert_allclose(pretrained.resize_position_embedding(constant, 17), np.ones((1, 17, 3)), rtol=1e-6)
  pooled, _ = vit.apply({'params': loaded}, jnp.zeros((2, 32, 32, 3)))
  assert pooled.shape == (2, 64)


def test_checkpoint_of_another_size_is_refused_with_the_names(tmp_path):
  np.savez(tmp_path / 'vit.npz', **_checkpoint(np.random.default_rng(0), width=32, heads=2))
  _, params = _vit_params(width=64)
  with pytest.raises(ValueError, match=r'embedding/kernel .* has shape \(8, 8, 3, 32\), the model wants'):
    pretrained.load_vit_npz(str(tmp_path / 'vit.npz'), params)


def test_train_state_starts_from_the_checkpoint_named_in_the_config(tmp_path, data_dir):
  from hivlp_jax import train  # pylint: disable=g-import-not-at-top
  from tests.conftest import tiny_config  # pylint: disable=g-import-not-at-top
  checkpoint = _checkpoint(np.random.default_rng(1))
  np.savez(tmp_path / 'vit.npz', **checkpoint)
  config = tiny_config(data_dir)
  config.model.image.init_checkpoint = str(tmp_path / 'vit.npz')
  state = train.create_train_state(config, train.create_model(config, vocab_size=50), jax.random.key(0))
  np.testing.assert_array_equal(state.params['image_tower']['cls'], checkpoint['cls'])
  assert 'text_tower' in state.params
