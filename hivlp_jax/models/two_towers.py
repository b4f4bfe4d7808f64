"""Two-tower image-text model: a ViT image tower and a Transformer text tower, no fusion.

The image tower also embeds videos: a clip [B, T, H, W, 3] runs its frames through the ViT with the same
weights, `video.aggregate` pools the frames, and the image head projects the result (models/video.py).

`TwoTowers(images, texts)` returns `TowerOutputs` (image and text embeddings, the learned temperature, with
the sigmoid loss its logit bias, and the masked-token logits when asked for). The embeddings are the full
nested-head projections [B, embed_dim], unnormalised; `matryoshka.normalized_prefix` reads them at any
nested dim. Either input may be None, so evaluation embeds images and texts separately.
"""

from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from hivlp_jax import errors
from hivlp_jax.models import bert
from hivlp_jax.models import encoders
from hivlp_jax.models import matryoshka
from hivlp_jax.models import video

Dtype = Any


class TowerOutputs(NamedTuple):
  """What `TwoTowers.__call__` returns; a field is None where its input was not given."""
  image: Optional[jnp.ndarray]  # [B, embed_dim] float32, unnormalised (of images or of clips).
  text: Optional[jnp.ndarray]  # [B, embed_dim] float32, unnormalised.
  temperature: jnp.ndarray  # Scalar.
  mlm_logits: Optional[jnp.ndarray] = None  # [B, L, vocab], with `masked_texts`.
  mvm_logits: Optional[jnp.ndarray] = None  # [B, patches, codebook], with `patch_mask`.
  logit_bias: Optional[jnp.ndarray] = None  # Scalar, with `sigmoid_loss`.


class MaskedTokenHead(nn.Module):
  """Predicts masked tokens of one tower from its token states and the other tower's global state.

  No cross attention: the other modality's pooled state is projected and added to every token state,
  then an MLP (BERT's transform: Dense, GELU, LayerNorm) and the output projection.
  token_states [B, N, W], other_pooled [B, W'] -> transformed [B, N, W] (before the output projection).
  """
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, token_states, other_pooled):
    width = token_states.shape[-1]
    context = nn.Dense(width, dtype=self.dtype, name='context')(other_pooled)
    x = token_states + context[:, None, :]
    x = nn.gelu(nn.Dense(width, dtype=self.dtype, name='transform')(x))
    return nn.LayerNorm(dtype=self.dtype, name='norm')(x)


class TwoTowers(nn.Module):
  """ViT + text Transformer, each pooled and projected by a nested (Matryoshka) head.

  With `mlm` / `mvm_codebook_size` it also has the masked-token heads of COTS masked vision-language
  modeling, which predict masked text tokens (vocabulary logits) and masked patches' visual-token ids.
  With `sigmoid_loss` its temperature and logit bias are SigLIP's (config.loss.kind='sigmoid').
  """
  config: ml_collections.ConfigDict  # config.model
  vocab_size: int
  mlm: bool = False
  mvm_codebook_size: int = 0  # 0: no masked vision modeling.
  sigmoid_loss: bool = False

  def setup(self):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    levers = dict(remat=cfg.remat, scan_layers=cfg.scan_layers)  # Memory and compile time; same function.
    self.image_tower = encoders.ViT(cfg.image.patch_size, cfg.image.width, cfg.image.depth, cfg.image.num_heads,
                           cfg.image.mlp_dim, dtype=dtype, masked_patches=self.mvm_codebook_size > 0,
                           pool=cfg.image.pool, **levers)
    text_tower = {'pre_ln': encoders.TextTransformer, 'bert': bert.BertTextTransformer}[cfg.text.architecture]
    self.text_tower = text_tower(self.vocab_size, cfg.text.max_len, cfg.text.width, cfg.text.depth,
                                 cfg.text.num_heads, cfg.text.mlp_dim, dtype=dtype, **levers)
    video.validate_config(cfg)  # Also for models built without config_lib.validate (tests, benchmarks).
    self.temporal = None  # 'mean': no parameters, so an image model's tree is what it was before videos.
    if cfg.video.temporal == 'transformer':
      self.temporal = video.TemporalTransformer(cfg.video.num_frames, cfg.video.depth, video.temporal_heads(cfg),
                                                cfg.image.mlp_dim, dtype=dtype, **levers,
                                                cells_per_frame=cfg.video.patch_grid ** 2,
                                                frame_differences=cfg.video.frame_differences)
    self.image_head = matryoshka.NestedProjection(cfg.embed_dim, dtype=dtype)
    self.text_head = matryoshka.NestedProjection(cfg.embed_dim, dtype=dtype)
    if self.sigmoid_loss:
      # SigLIP's t' (t = exp(t') = 1 / temperature) and bias b at the paper's init: every logit starts near
      # -10, so the B^2 - B negatives against B positives need no large first corrections. Not clamped (big_vision).
      self.sigmoid_log_scale = self.param('sigmoid_log_scale', nn.initializers.constant(jnp.log(10.0)), ())
      self.sigmoid_bias = self.param('sigmoid_bias', nn.initializers.constant(-10.0), ())
    else:
      self.log_temperature = self.param(
          'log_temperature', nn.initializers.constant(jnp.log(cfg.temperature_init)), ())
    if self.mlm:
      self.mlm_head = MaskedTokenHead(dtype=dtype)
      self.mlm_bias = self.param('mlm_bias', nn.initializers.zeros, (self.vocab_size,))
    if self.mvm_codebook_size:
      self.mvm_head = MaskedTokenHead(dtype=dtype)
      self.mvm_output = nn.Dense(self.mvm_codebook_size, dtype=dtype)

  def temperature(self) -> jnp.ndarray:
    if self.sigmoid_loss:
      return jnp.exp(-self.sigmoid_log_scale)
    # No clip here: the train step clamps the parameter itself to [temperature_min, temperature_max], so the
    # gradient never vanishes at a clamp that Adam could not leave (as open_clip and ALBEF do).
    return jnp.exp(self.log_temperature)

  def _encode_images(self, pixels: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Preprocessed float32 images [B, S, S, 3] or clips [B, T, S, S, 3] -> pooled [B, width] (a clip's
    aggregated over its frames) and embedding float32 [B, embed_dim]."""
    if pixels.ndim == 5:  # The frames as one batch of images through the shared tower, then aggregated.
      batch, num_frames = pixels.shape[:2]
      if self.config.video.frame_differences:
        pixels = video.with_differences(pixels)
      images, tokens = self.image_tower(pixels.reshape((-1,) + pixels.shape[2:]))
      images = images.reshape(batch, pixels.shape[1], -1)
      frames, differences = images[:, :num_frames], images[:, num_frames:]  # No differences: [B, 0, W].
      grid = self.config.video.patch_grid
      cells = video.patch_cells(tokens, grid).reshape(batch, num_frames, grid * grid, -1) if grid else None
      pooled = video.aggregate(frames, self.temporal, cells, differences)
    else:
      pooled, _ = self.image_tower(pixels)
    return pooled, self.image_head(pooled).astype(jnp.float32)

  def _encode_texts(self, tokens: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """int32 [B, L] -> pooled [B, width] and embedding float32 [B, embed_dim]."""
    pooled, _ = self.text_tower(tokens)
    return pooled, self.text_head(pooled).astype(jnp.float32)

  def embed_images(self, images: jnp.ndarray) -> jnp.ndarray:
    """uint8 images [B, H, W, 3] or clips [B, T, H, W, 3] -> float32 [B, embed_dim]."""
    return self._encode_images(encoders.preprocess_images(images, self.config.image_size))[1]

  def embed_texts(self, tokens: jnp.ndarray) -> jnp.ndarray:
    """int32 [B, L] -> float32 [B, embed_dim]."""
    return self._encode_texts(tokens)[1]

  def __call__(self, images: Optional[jnp.ndarray] = None, texts: Optional[jnp.ndarray] = None, *,
               masked_texts: Optional[jnp.ndarray] = None, patch_mask: Optional[jnp.ndarray] = None):
    """Embeds images [B, H, W, 3] (or clips [B, T, H, W, 3]) uint8 and texts [B, L] int32 (either may be None).

    For masked vision-language modeling pass both, and `masked_texts` int32 [B, L] (with `mlm`) and/or
    `patch_mask` bool [B, patches] (with `mvm_codebook_size`): the outputs then hold `mlm_logits`
    [B, L, vocab] and `mvm_logits` [B, patches, codebook]. The masked views are extra passes through the
    towers; the embeddings always come from the unmasked ones.
    """
    mlm_logits = mvm_logits = None
    image_embedding = text_embedding = image_pooled = text_pooled = None
    if patch_mask is not None and images is not None and images.ndim == 5:
      raise errors.InputError('config.mvlm.mvm_weight > 0 with video inputs: masked vision modeling of clips is '
                              'not built (its visual tokens are per image); set config.mvlm.mvm_weight=0.')
    if images is not None:
      pixels = encoders.preprocess_images(images, self.config.image_size)  # Once, for the unmasked and masked passes.
      image_pooled, image_embedding = self._encode_images(pixels)
    if texts is not None:
      text_pooled, text_embedding = self._encode_texts(texts)
    if masked_texts is not None:
      _, text_states = self.text_tower(masked_texts)
      transformed = self.mlm_head(text_states, image_pooled)
      mlm_logits = (self.text_tower.attend(transformed) + self.mlm_bias).astype(jnp.float32)
    if patch_mask is not None:
      _, image_states = self.image_tower(pixels, patch_mask)
      transformed = self.mvm_head(image_states, text_pooled)
      mvm_logits = self.mvm_output(transformed).astype(jnp.float32)
    return TowerOutputs(image_embedding, text_embedding, self.temperature(), mlm_logits, mvm_logits,
                        self.sigmoid_bias if self.sigmoid_loss else None)
