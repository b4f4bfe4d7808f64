"""Masked vision-language modeling: masking statistics, the masked-token loss, heads without cross attention."""

import functools

import jax
import numpy as np
import pytest
from scipy import ndimage

from hivlp_jax import losses
from hivlp_jax import masking
from hivlp_jax import train_step
from tests.conftest import tiny_config
from tests.test_train import _random_batch

SPECIAL_IDS = (0, 1, 2, 3, 4)  # [PAD], [UNK], [CLS], [SEP], [MASK], as tokenizer.SPECIAL_TOKENS.
MASK_ID = 4


def test_text_masking_statistics_follow_bert():
  rng = np.random.default_rng(0)
  vocab_size = 100
  tokens = rng.integers(5, vocab_size, (4000, 24)).astype(np.int32)
  tokens[:, 0] = 2  # [CLS]
  lengths = rng.integers(6, 24, 4000)
  for row, length in enumerate(lengths):
    tokens[row, length - 1] = 3  # [SEP]
    tokens[row, length:] = 0  # [PAD]
  masked, chosen = masking.mask_text(rng, tokens, mask_ratio=0.15, mask_id=MASK_ID, vocab_size=vocab_size,
                                     special_ids=SPECIAL_IDS)
  special = np.isin(tokens, SPECIAL_IDS)
  assert not np.any(chosen & special)
  np.testing.assert_array_equal(masked[~chosen], tokens[~chosen])  # Only chosen positions change.
  assert chosen[~special].mean() == pytest.approx(0.15, abs=0.005)
  # About 7,600 chosen tokens: the 80/10/10 split within +-1.5 points (over 3 standard errors).
  to_mask = masked[chosen] == MASK_ID
  kept = masked[chosen] == tokens[chosen]
  assert to_mask.mean() == pytest.approx(0.8, abs=0.015)
  # Random replacements are ordinary tokens; 1 in 95 of them happens to draw the original token.
  replaced = ~to_mask & ~kept
  assert replaced.mean() == pytest.approx(0.1 * 94 / 95, abs=0.015)
  assert kept.mean() == pytest.approx(0.1 + 0.1 / 95, abs=0.015)
  assert not np.any(np.isin(masked[chosen][replaced], SPECIAL_IDS))
  assert chosen.sum() > 7000


@pytest.mark.parametrize('grid,ratio,min_block', [((14, 14), 0.4, 16), ((4, 4), 0.4, 2)])
def test_block_masks_hit_the_ratio_and_are_made_of_blocks(grid, ratio, min_block):
  rng = np.random.default_rng(1)
  target = round(ratio * grid[0] * grid[1])
  masks = [masking.block_mask(rng, grid, mask_ratio=ratio, min_block_patches=min_block) for _ in range(200)]
  assert all(m.shape == (grid[0] * grid[1],) and m.sum() == target for m in masks)
  components = [ndimage.label(m.reshape(grid))[1] for m in masks]
  largest = [np.bincount(ndimage.label(m.reshape(grid))[0].ravel())[1:].max() for m in masks]
  # Contiguous blocks, not scattered patches: few connected pieces, the largest at least a minimum block.
  assert np.mean(components) <= target / min_block + 1
  assert np.median(largest) >= min_block
  # Different masks for different draws.
  assert len({m.tobytes() for m in masks}) > 100


def _numpy_masked_cross_entropy(logits, targets, masked):
  logits, rows = logits.astype(np.float64)[masked], targets[masked]
  top = logits.max(-1, keepdims=True)
  log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  return -log_probs[np.arange(len(rows)), rows].mean(), np.mean(logits.argmax(-1) == rows)


def test_masked_token_loss_equals_numpy_over_masked_positions_on_any_device_count():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(8, 6, 11)).astype(np.float32)
  targets = rng.integers(0, 11, (8, 6))
  masked = rng.random((8, 6)) < 0.3
  masked[:2] = False  # Device 0 of 4 has no masked position: the global mean must not care.
  expected_loss, expected_accuracy = _numpy_masked_cross_entropy(logits, targets, masked)
  loss, accuracy = losses.masked_token_loss(logits, targets, masked)
  np.testing.assert_allclose([loss, accuracy], [expected_loss, expected_accuracy], rtol=1e-5)
  for n in (2, 4):
    fn = jax.pmap(functools.partial(losses.masked_token_loss, axis_name='batch'), 'batch',
                  devices=jax.local_devices()[:n])
    per_device = fn(*(x.reshape((n, -1) + x.shape[1:]) for x in (logits, targets, masked)))
    np.testing.assert_allclose(np.mean(per_device, axis=1), [expected_loss, expected_accuracy], rtol=1e-5)
  # Unmasked logits do not matter.
  changed = np.where(masked[..., None], logits, 100.0 * rng.normal(size=logits.shape)).astype(np.float32)
  np.testing.assert_allclose(losses.masked_token_loss(changed, targets, masked)[0], expected_loss, rtol=1e-5)


def _mvlm_model_and_params(config, vocab_size=50):
  config.mvlm.mlm_weight = config.mvlm.mvm_weight = 1.0
  model = train_step.create_model(config, vocab_size=vocab_size)
  return model, train_step.create_train_state(config, model, jax.random.key(0)).params


def test_heads_see_the_other_modality_and_have_no_cross_attention():
  config = tiny_config('unused')
  config.model.image.depth = config.model.text.depth = 1
  model, params = _mvlm_model_and_params(config)
  batch = _random_batch(config, 4, 50)
  patches = (config.model.image_size // config.model.image.patch_size)**2
  patch_mask = np.zeros((4, patches), bool)
  patch_mask[:, :patches // 2] = True
  masked_text = batch['text'].copy()
  masked_text[:, 1:4] = MASK_ID

  def outputs(images, texts):
    outputs = model.apply({'params': params}, images, texts, masked_texts=masked_text, patch_mask=patch_mask)
    return np.asarray(outputs.mlm_logits), np.asarray(outputs.mvm_logits)

  mlm, mvm = outputs(batch['image'], batch['text'])
  codebook = config.visual_tokenizer.codebook_size
  assert mlm.shape == (4, config.model.text.max_len, 50) and mvm.shape == (4, patches, codebook)
  other = _random_batch(config, 4, 50, seed=1)
  # Another paired image changes the text predictions (the masked text itself is the same) ...
  assert np.abs(outputs(other['image'], batch['text'])[0] - mlm).max() > 1e-3
  # ... and another paired caption changes the patch predictions.
  assert np.abs(outputs(batch['image'], other['text'])[1] - mvm).max() > 1e-3
  # The pixels under masked patches cannot leak into the patch predictions.
  size, patch = config.model.image_size, config.model.image.patch_size
  hidden = batch['image'].copy()
  hidden[:, :patch * (patches // 2) // (size // patch)] = 0  # The top rows of patches, all masked.
  np.testing.assert_array_equal(outputs(hidden, batch['text'])[1], mvm)
  # No cross-stream module: every attention layer sits inside one tower's own encoder.
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  attention = {p for p in paths if 'Attention' in p}
  assert attention and all(p.startswith(("['image_tower']['encoder']", "['text_tower']['encoder']"))
                           for p in attention)
  assert {p.split("'")[3] for p in paths if p.startswith("['mlm_head']")} == {'context', 'transform', 'norm'}

