"""The visual tokenizer stage: the dVAE learns, its checkpoint restores to the same codes, codes files are checked."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from hivlp_jax import config_lib
from hivlp_jax import visual_tokenizer
from hivlp_jax.models import dvae
from tests.conftest import tiny_config

# Two of the 4 simulated devices: with all 4 on a 2-core machine, the CPU all-reduce of this conv-heavy step
# was seen to miss XLA's 40 s rendezvous deadline (one device thread starved) and abort the process.
DEVICES = lambda: jax.local_devices()[:2]


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
  """(config, workdir) of the tokenizer stage run once on the tiny data set (2 devices)."""
  config = tiny_config(data_dir)
  workdir = str(tmp_path_factory.mktemp('tokenizer'))
  visual_tokenizer.train_tokenizer(config, workdir, devices=DEVICES())
  return config, workdir


def test_model_code_grid_is_the_patch_grid():
  for image_size, patch_size in ((32, 8), (32, 16)):
    model = dvae.DiscreteVAE(image_size=image_size, patch_size=patch_size, codebook_size=16, hidden_dim=16,
                             code_dim=8)
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)  # Resized to image_size.
    variables = model.init(jax.random.key(0), images, rng=jax.random.key(1), temperature=1.0)
    reconstruction, logits = model.apply(variables, images, rng=jax.random.key(1), temperature=0.5)
    grid = image_size // patch_size
    assert reconstruction.shape == (2, image_size, image_size, 3)
    assert logits.shape == (2, grid, grid, 16)
    codes = model.apply(variables, images, method=model.codes)
    assert codes.dtype == np.int32 and codes.shape == (2, grid, grid)
    np.testing.assert_array_equal(codes, np.argmax(logits, -1))  # Deterministic: the argmax of the logits.
  with pytest.raises(ValueError, match='power of 2'):
    dvae.num_downsamplings(14)


def test_kl_to_uniform_and_perplexity():
  np.testing.assert_allclose(dvae.kl_to_uniform(np.zeros((3, 8))), 0.0, atol=1e-6)
  np.testing.assert_allclose(dvae.kl_to_uniform(np.array([[1e4, 0, 0, 0]])), np.log(4), rtol=1e-5)
  np.testing.assert_allclose(dvae.perplexity(np.array([5.0, 0, 0, 0])), 1.0, rtol=1e-6)
  np.testing.assert_allclose(dvae.perplexity(np.array([2.0, 2, 2, 2])), 4.0, rtol=1e-6)


def test_training_beats_the_mean_image_and_uses_many_codes(trained):
  config, workdir = trained
  with open(os.path.join(workdir, 'metrics.json')) as f:
    metrics = json.load(f)
  assert metrics['step'] == config.visual_tokenizer.num_train_steps
  assert metrics['reconstruction_mse'] < 0.85 * metrics['mean_image_mse'], metrics
  assert metrics['perplexity'] > 4.0 and metrics['codes_used'] >= 8, metrics  # A collapsed codebook: 1.
  codes = np.load(os.path.join(workdir, 'codes-train.npy'))
  assert codes.dtype == np.int32 and codes.shape == (512, 4, 4)
  assert codes.min() >= 0 and codes.max() < config.visual_tokenizer.codebook_size


def test_restored_checkpoint_gives_the_same_codes_and_resume_continues(trained, tmp_path):
  config, workdir = trained
  cached = np.load(os.path.join(workdir, 'codes-train.npy'))
  copy = str(tmp_path / 'copy')
  shutil.copytree(workdir, copy)
  os.remove(os.path.join(copy, 'codes-train.npy'))
  config.visual_tokenizer.workdir = copy
  # No cache: the codes are computed with the restored (orbax) parameters, then cached.
  np.testing.assert_array_equal(visual_tokenizer.load_codes(config), cached)
  assert os.path.exists(os.path.join(copy, 'codes-train.npy'))
  np.testing.assert_array_equal(visual_tokenizer.load_codes(config, num_images=512), cached)
  # Resuming with more steps continues from the checkpoint instead of starting afresh.
  config.visual_tokenizer.num_train_steps += 2
  metrics = visual_tokenizer.train_tokenizer(config, copy, devices=DEVICES())
  assert metrics['step'] == config.visual_tokenizer.num_train_steps
  config.visual_tokenizer.hidden_dim = 16
  with pytest.raises(ValueError, match='hidden_dim'):
    visual_tokenizer.train_tokenizer(config, copy, devices=DEVICES())


def test_load_codes_from_a_user_file_and_its_checks(data_dir, tmp_path):
  config = tiny_config(data_dir)
  path = str(tmp_path / 'codes.npy')
  config.visual_tokenizer.codes_file = path
  codes = np.random.default_rng(0).integers(0, 64, (512, 4, 4))
  np.save(path, codes)
  loaded = visual_tokenizer.load_codes(config)
  assert loaded.dtype == np.int32
  np.testing.assert_array_equal(loaded, codes)
  bad_cases = {'grid of 4x4': codes[:, :2, :2], 'codes for 100 images': codes[:100],
               'outside': np.where(codes == 0, 64, codes)}
  for message, bad in bad_cases.items():
    np.save(path, bad)
    with pytest.raises(ValueError, match=message):
      visual_tokenizer.load_codes(config, num_images=512)
  with pytest.raises(ValueError, match='split'):
    visual_tokenizer.load_codes(config, split='validation', num_images=64)
  config.visual_tokenizer.codes_file = ''
  with pytest.raises(ValueError, match=r'config.visual_tokenizer.workdir.*--mode=tokenizer'):
    visual_tokenizer.load_codes(config, num_images=512)
  config.visual_tokenizer.workdir = str(tmp_path / 'empty')
  with pytest.raises(FileNotFoundError, match='--mode=tokenizer'):
    visual_tokenizer.load_codes(config, num_images=512)


def test_validate_config_names_the_field(data_dir):
  cases = {'codebook_size': 1, 'batch_size': 30, 'temperature_end': 2.0, 'eval_split': 'dev', 'kl_weight': -1.0}
  for name, value in cases.items():
    config = tiny_config(data_dir)
    config.visual_tokenizer[name] = value
    with pytest.raises(ValueError, match=f'config.visual_tokenizer.{name}'):
      config_lib.validate_visual_tokenizer(config)
  config = tiny_config(data_dir)
  config.model.image.patch_size = 4
  config.model.image_size = 24  # 6x6 patches, fine; a patch of 6 is not a power of 2.
  config_lib.validate_visual_tokenizer(config)
  config.model.image.patch_size = 6
  with pytest.raises(ValueError, match='patch_size'):
    config_lib.validate_visual_tokenizer(config)
