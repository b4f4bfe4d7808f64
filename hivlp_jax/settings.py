"""Frozen settings of the train step, read from the config and validated once at start-up.

The step is composed from loss terms chosen here: the contrastive loss at every nested dim (in-batch
negatives, or momentum keys and queues with distillation, KL alignment and the noisy-pair filter; or SigLIP's
in-batch sigmoid loss) and the masked-token losses. A bad value fails in `StepSettings.from_config` with a
message naming the field.
"""

import dataclasses
import math
from typing import Optional

import ml_collections

from hivlp_jax import errors
from hivlp_jax.models import matryoshka

MOMENTUM_SCHEDULES = ('constant', 'cosine')
# KL(p_i2t || p_t2i), KL(p_t2i || p_i2t), or the mean of both.
KL_DIRECTIONS = ('i2t_t2i', 't2i_i2t', 'symmetric')
# 'target': no gradient through the first argument of each KL (the distribution the other is pulled to).
KL_STOP_GRADIENTS = ('none', 'target')
# config.loss.kind: 'softmax' (InfoNCE, in-batch or over the queues) or 'sigmoid' (SigLIP, in-batch only).
LOSS_KINDS = ('softmax', 'sigmoid')
# What the sigmoid loss cannot serve: they all come with the momentum queues of the softmax loss.
SIGMOID_REFUSED = ('queue_size', 'distill_weight', 'kl_weight', 'filter_noisy_pairs', 'image_id_positives')


def check_field(condition: bool, field: str, value, requirement: str) -> None:
  """Raises ValueError('config.FIELD=VALUE REQUIREMENT.') unless `condition` holds."""
  if not condition:
    raise errors.InputError(f'config.{field}={value!r} {requirement}.')


@dataclasses.dataclass(frozen=True)
class QueueSettings:
  """Momentum towers and negative queues (MoCo/ALBEF instance level, COTS task level)."""
  size: int  # Pairs per queue, a multiple of the global batch.
  momentum: float  # EMA of the momentum towers.
  momentum_schedule: str  # 'constant' or 'cosine' (raised to 1 at the last step).
  distill_weight: float  # ALBEF momentum distillation; 0: off.
  distill_warmup_steps: int
  kl_weight: float  # COTS task-level KL alignment; 0: off.
  kl_direction: str
  kl_stop_gradient: str
  filter_noisy_pairs: bool  # COTS adaptive momentum filter.
  filter_k: float
  filter_stats_momentum: float
  filter_warmup_steps: int  # Steps during which the filter only gathers statistics and drops nothing.

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> Optional['QueueSettings']:
    """None without queues (config.contrastive.queue_size == 0): in-batch negatives only."""
    c = config.contrastive
    check_field(c.queue_size >= 0, 'contrastive.queue_size', c.queue_size, 'must be >= 0 (0: in-batch negatives only)')
    if c.queue_size == 0:
      for name in ('distill_weight', 'kl_weight', 'filter_noisy_pairs'):
        check_field(not c[name], f'contrastive.{name}', c[name], 'needs the momentum queues: set '
               'config.contrastive.queue_size to a multiple of config.batch_size')
      return None
    if c.queue_size % config.batch_size:
      raise errors.InputError(f'config.contrastive.queue_size={c.queue_size} must be a positive multiple of the global '
                              f'batch (config.batch_size={config.batch_size}), so that every step writes whole rows '
                              'of every device shard; e.g. '
                              f'{max(1, c.queue_size // config.batch_size) * config.batch_size}.')
    check_field(0.0 <= c.momentum <= 1.0, 'contrastive.momentum', c.momentum, 'must be in [0, 1]')
    for name, allowed in (('momentum_schedule', MOMENTUM_SCHEDULES), ('kl_direction', KL_DIRECTIONS),
                          ('kl_stop_gradient', KL_STOP_GRADIENTS)):
      check_field(c[name] in allowed, f'contrastive.{name}', c[name], f'is not one of {allowed}')
    check_field(0.0 <= c.distill_weight <= 1.0, 'contrastive.distill_weight', c.distill_weight, 'must be in [0, 1]')
    for name in ('distill_warmup_steps', 'kl_weight', 'filter_k', 'filter_warmup_steps'):
      check_field(c[name] >= 0, f'contrastive.{name}', c[name], 'must be >= 0')
    check_field(0.0 <= c.filter_stats_momentum < 1.0, 'contrastive.filter_stats_momentum', c.filter_stats_momentum,
           'must be in [0, 1)')
    return cls(size=int(c.queue_size), momentum=float(c.momentum), momentum_schedule=c.momentum_schedule,
               distill_weight=float(c.distill_weight), distill_warmup_steps=int(c.distill_warmup_steps),
               kl_weight=float(c.kl_weight), kl_direction=c.kl_direction, kl_stop_gradient=c.kl_stop_gradient,
               filter_noisy_pairs=bool(c.filter_noisy_pairs), filter_k=float(c.filter_k),
               filter_stats_momentum=float(c.filter_stats_momentum),
               filter_warmup_steps=int(c.filter_warmup_steps))


@dataclasses.dataclass(frozen=True)
class MaskedModelingSettings:
  """COTS token level: masked language modeling and masked vision modeling (weights; 0: off)."""
  mlm_weight: float
  mvm_weight: float

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> Optional['MaskedModelingSettings']:
    """None when both weights are 0."""
    m = config.mvlm
    for name in ('mlm_weight', 'mvm_weight'):
      check_field(m[name] >= 0, f'mvlm.{name}', m[name], 'must be >= 0 (0: off)')
    for name in ('text_mask_ratio', 'image_mask_ratio'):
      check_field(0.0 < m[name] < 1.0, f'mvlm.{name}', m[name], 'must be in (0, 1)')
    patches = (config.model.image_size // config.model.image.patch_size)**2
    check_field(1 <= m.min_block_patches <= patches, 'mvlm.min_block_patches', m.min_block_patches,
           f'must be in [1, {patches}] (the patches of a {config.model.image_size} px image)')
    if m.mvm_weight and config.data.name != 'embedded_scenes':
      # The visual-token codes are cached per image of an in-memory split; streamed sources would need the
      # frozen tokenizer inside the step.
      raise errors.InputError(f'config.mvlm.mvm_weight={m.mvm_weight}: masked vision modeling runs on the '
                              f'embedded data set only so far, not on {config.data.name!r}; set it to 0.')
    if not (m.mlm_weight or m.mvm_weight):
      return None
    return cls(mlm_weight=float(m.mlm_weight), mvm_weight=float(m.mvm_weight))


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """Everything the train step needs from the config, hashable and fixed for the run."""
  nested_dims: tuple[int, ...]
  dim_weights: tuple[float, ...]
  loss_kind: str  # One of LOSS_KINDS.
  num_train_steps: int
  accumulation_steps: int  # Micro-batches per optimizer step (train_step.accumulated_loss_and_grads); 1: off.
  log_temperature_range: tuple[float, float]  # The learned log temperature is clamped to it after each update.
  queue: Optional[QueueSettings]
  masked_modeling: Optional[MaskedModelingSettings]
  image_id_positives: bool = False  # Every pair of the same image is a positive (batch 'image_id', queue ids).

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'StepSettings':
    dims = matryoshka.validate_dims(config.model.nested_dims, config.model.embed_dim)
    if len(config.loss.dim_weights) != len(dims):
      raise errors.InputError(f'config.loss.dim_weights has {len(config.loss.dim_weights)} entries but '
                              f'config.model.nested_dims has {len(dims)}: give one weight per nested dim.')
    for weight in config.loss.dim_weights:
      check_field(math.isfinite(weight) and weight >= 0, 'loss.dim_weights', tuple(config.loss.dim_weights),
             'must be finite and >= 0')
    m = config.model
    check_field(0 < m.temperature_min, 'model.temperature_min', m.temperature_min, 'must be > 0 (its log is taken)')
    check_field(m.temperature_min <= m.temperature_init <= m.temperature_max, 'model.temperature_init',
                m.temperature_init, f'must lie in [temperature_min={m.temperature_min}, temperature_max='
                f'{m.temperature_max}]')
    kind = config.loss.kind
    check_field(kind in LOSS_KINDS, 'loss.kind', kind, f'is not one of {LOSS_KINDS}')
    refused = [f'config.contrastive.{name}={config.contrastive[name]!r}' for name in SIGMOID_REFUSED
               if kind == 'sigmoid' and config.contrastive[name]]
    if refused:
      raise errors.InputError(f"config.loss.kind='sigmoid' cannot serve {', '.join(refused)}: the sigmoid loss "
                              'trains on in-batch pairs only (no momentum queues, distillation, KL alignment, '
                              "noisy-pair filter or image-id positives). Set them to 0 / False, or use "
                              "config.loss.kind='softmax'.")
    return cls(nested_dims=dims, dim_weights=tuple(float(w) for w in config.loss.dim_weights), loss_kind=kind,
               num_train_steps=int(config.num_train_steps), accumulation_steps=int(config.accumulation_steps),
               log_temperature_range=(math.log(m.temperature_min), math.log(m.temperature_max)),
               queue=QueueSettings.from_config(config), masked_modeling=MaskedModelingSettings.from_config(config),
               image_id_positives=bool(config.contrastive.image_id_positives))
