"""Masking for masked vision-language modeling (COTS token level): BERT text masks, BEiT block masks.

Masks are drawn on the host, in numpy, from a generator seeded by (seed, step) like the data order, so a
resumed run draws the same masks. The model sees the masked inputs; the losses read the targets at the
masked positions only.
"""

import math
from typing import Sequence

import numpy as np


def mask_text(rng: np.random.Generator, tokens: np.ndarray, *, mask_ratio: float, mask_id: int,
              vocab_size: int, special_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """BERT masking: each ordinary token is chosen with probability `mask_ratio`; of the chosen, 80%
  become [MASK], 10% a random ordinary token and 10% stay as they are.

  Args:
    tokens: int32 [B, L] ([PAD] = 0); special tokens ([CLS], [SEP], [PAD], ...) are never chosen.
  Returns:
    masked_tokens int32 [B, L], and chosen bool [B, L]: the positions whose original token is the target.
  """
  special = np.isin(tokens, np.asarray(special_ids))
  chosen = (rng.random(tokens.shape) < mask_ratio) & ~special
  action = rng.random(tokens.shape)
  ordinary = np.setdiff1d(np.arange(vocab_size), special_ids)
  random_tokens = ordinary[rng.integers(0, len(ordinary), tokens.shape)]
  masked = np.where(chosen & (action < 0.8), mask_id, tokens)
  masked = np.where(chosen & (action >= 0.8) & (action < 0.9), random_tokens, masked)
  return masked.astype(np.int32), chosen


def block_mask(rng: np.random.Generator, grid: tuple[int, int], *, mask_ratio: float, min_block_patches: int,
               max_attempts: int = 10) -> np.ndarray:
  """BEiT block-wise masking of one patch grid: rectangles of at least `min_block_patches` patches and aspect
  ratio in [0.3, 1 / 0.3] are added at random places until round(mask_ratio * patches) are masked.

  Returns bool [grid_h * grid_w] (row-major, like the ViT's patch sequence).
  """
  height, width = grid
  target = int(round(mask_ratio * height * width))
  mask = np.zeros((height, width), bool)
  log_aspect = (math.log(0.3), math.log(1 / 0.3))
  while mask.sum() < target:
    added = 0
    for _ in range(max_attempts):
      remaining = target - mask.sum()
      area = rng.uniform(min(min_block_patches, remaining), remaining)
      aspect = math.exp(rng.uniform(*log_aspect))
      h = int(round(math.sqrt(area * aspect)))
      w = int(round(math.sqrt(area / aspect)))
      if not (0 < h <= height and 0 < w <= width):
        continue
      top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
      block = mask[top:top + h, left:left + w]
      new = h * w - block.sum()
      if 0 < new <= remaining:  # BEiT's rule: never overshoot the target.
        block[:] = True
        added = new
        break
    if not added:
      # Blocks that fit no longer exist (a small or nearly full grid): finish with single patches.
      free = np.flatnonzero(~mask.reshape(-1))
      mask.reshape(-1)[rng.choice(free, target - mask.sum(), replace=False)] = True
  return mask.reshape(-1)


def mask_batch(rng: np.random.Generator, batch: dict, *, text_mask_ratio: float, image_mask_ratio: float,
               min_block_patches: int, grid: tuple[int, int], mask_id: int, vocab_size: int,
               special_ids: Sequence[int], mask_text_tokens: bool, mask_patches: bool) -> dict:
  """Adds the masked inputs to a host batch {'image' [B, ...], 'text' int32 [B, L], ...}.

  Adds 'masked_text' int32 [B, L] and 'text_mask' bool [B, L] (MLM), and 'patch_mask' bool [B, patches]
  (MVM), each only when asked for.
  """
  batch = dict(batch)
  if mask_text_tokens:
    batch['masked_text'], batch['text_mask'] = mask_text(
        rng, batch['text'], mask_ratio=text_mask_ratio, mask_id=mask_id, vocab_size=vocab_size,
        special_ids=special_ids)
  if mask_patches:
    batch['patch_mask'] = np.stack([
        block_mask(rng, grid, mask_ratio=image_mask_ratio, min_block_patches=min_block_patches)
        for _ in range(batch['text'].shape[0])])
  return batch
