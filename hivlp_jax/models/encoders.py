"""The transformer encoders of the two towers: a ViT and a pre-LN text Transformer, and image preprocessing.

`two_towers.TwoTowers` puts a nested head on each; `bert.BertTextTransformer` is the post-LN text variant.
Memory and compile-time levers of every `Encoder` (config.model): `remat` recomputes each block in the
backward pass (`REMAT_POLICIES`), `scan_layers` runs the blocks as one `nn.scan`, whose params are stacked
under `blocks` with a leading [depth] axis (`stack_layers` / `unstack_layers` convert between the layouts).
"""

from collections.abc import Mapping
import contextlib
import re
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
# config.model.remat -> the jax.checkpoint policy of each block (what the backward pass may keep).
REMAT_POLICIES = {
    'none': None,  # No remat: every activation is kept.
    # Keep the outputs of the weight matmuls (QKV, attention output, MLP); recompute attention scores, softmax,
    # LayerNorm and GELU, which are cheap in FLOPs but [B, heads, L, L] and [B, L, mlp] in memory.
    'block': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'block_full': jax.checkpoint_policies.nothing_saveable,  # Keep only each block's input.
}
SCANNED = 'blocks'  # The params of scanned blocks, stacked [depth, ...]; unscanned they are block0, block1, ...
_BLOCK_NAME = re.compile(r'block(\d+)')
_fallbacks_logged = set()
_xla_only = []  # Non-empty inside `xla_attention()`.


@contextlib.contextmanager
def xla_attention():
  """Traces in the block use XLA attention on any backend: for lowering to another platform than the
  default one (the CPU FLOP count of benchmarks/train_step.py on a GPU host), where cuDNN has no rule."""
  _xla_only.append(True)
  try:
    yield
  finally:
    _xla_only.pop()


def dot_product_attention(query, key, value, mask=None):
  """flax's `attention_fn`, through `jax.nn.dot_product_attention`: logits and softmax in float32.

  query [B, T, heads, head_dim], key and value [B, S, heads, head_dim], mask bool (or 0/1) broadcastable to
  [B, heads, T, S] (True: attend) -> [B, T, heads, head_dim] in the inputs' dtype. On GPU in bf16 / fp16,
  cuDNN flash attention where it takes the shapes; otherwise XLA's implementation, with one log line saying why.
  """
  mask = None if mask is None else mask.astype(jnp.bool_)
  if jax.default_backend() == 'gpu' and not _xla_only:
    reason = 'it needs bfloat16 or float16'
    if query.shape[1] % 2 or key.shape[1] % 2:
      # jax 0.11's cuDNN backward refuses odd lengths (a ViT's 197 tokens), and under remat that check runs
      # after this function returned, where the except below cannot fall back: decide here.
      reason = 'its backward pass needs even sequence lengths'
    elif query.dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
      try:  # cuDNN's shape and version checks run here, at trace time.
        # cuDNN adds the mask as a bias, which must have the full [.., T, S] shape.
        full_mask = None if mask is None else jnp.broadcast_to(mask, mask.shape[:2] + (query.shape[1], key.shape[1]))
        return jax.nn.dot_product_attention(query, key, value, mask=full_mask, implementation='cudnn')
      except (NotImplementedError, ValueError, RuntimeError) as e:
        reason = str(e)
    message = f'cuDNN flash attention not used for query {query.shape} {query.dtype} ({reason}): XLA attention.'
    if message not in _fallbacks_logged:
      _fallbacks_logged.add(message)
      logging.info(message)
  return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation='xla')


def has_scanned_layers(params) -> bool:
  """Whether a params tree holds scanned (stacked) encoder blocks."""
  return isinstance(params, Mapping) and any(k == SCANNED or has_scanned_layers(v) for k, v in params.items())


def stack_layers(params) -> dict:
  """Params of unscanned encoders (block0, block1, ...) -> the scan_layers layout: `blocks`, [depth, ...] leaves."""
  if not isinstance(params, Mapping):
    return params
  blocks = sorted((k for k in params if _BLOCK_NAME.fullmatch(k)), key=lambda k: int(k[len('block'):]))
  stacked = {k: stack_layers(v) for k, v in params.items() if k not in blocks}
  if blocks:
    stacked[SCANNED] = jax.tree.map(lambda *xs: jnp.stack(xs), *(params[k] for k in blocks))
  return stacked


def unstack_layers(params) -> dict:
  """The inverse of `stack_layers`: every `blocks` subtree [depth, ...] -> block0 .. block{depth - 1}."""
  if not isinstance(params, Mapping):
    return params
  unstacked = {}
  for k, v in params.items():
    if k == SCANNED:
      depth = jax.tree.leaves(v)[0].shape[0]
      unstacked.update({f'block{i}': jax.tree.map(lambda x, i=i: x[i], v) for i in range(depth)})
    else:
      unstacked[k] = unstack_layers(v)
  return unstacked


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform())(x)
    x = nn.gelu(x)
    return nn.Dense(width, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform())(x)


class EncoderBlock(nn.Module):
  """Pre-LayerNorm Transformer block."""
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype,
                                        kernel_init=nn.initializers.xavier_uniform(),
                                        attention_fn=dot_product_attention)(y, y, mask=mask)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype)(x)
    return x + MlpBlock(self.mlp_dim, dtype=self.dtype)(y)


class Encoder(nn.Module):
  """`depth` blocks (pre-LN `EncoderBlock` by default), then a LayerNorm unless `final_norm` is False.

  x [B, L, W], mask broadcastable to [B, heads, L, L] or None -> [B, L, W]. `remat` (a key of
  REMAT_POLICIES) and `scan_layers` change memory and compile time, not the function.
  """
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  block: Any = None  # A block module class taking (num_heads, mlp_dim, dtype=, name=); None: EncoderBlock.
  final_norm: bool = True
  remat: str = 'none'
  scan_layers: bool = False

  @nn.compact
  def __call__(self, x, mask=None):
    block = self.block or EncoderBlock
    if self.remat != 'none':
      # Scan already keeps XLA from merging the recomputation into the forward pass: remat's guard is not needed.
      block = nn.remat(block, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan_layers)
    if self.scan_layers:
      # One traced block for every layer; the mask is the same in each (broadcast), params get a [depth] axis.
      scan = nn.scan(lambda module, carry, mask: (module(carry, mask), None), variable_axes={'params': 0},
                     split_rngs={'params': True}, in_axes=nn.broadcast, length=self.depth)
      x, _ = scan(block(self.num_heads, self.mlp_dim, dtype=self.dtype, name=SCANNED), x, mask)
    else:
      for i in range(self.depth):
        x = block(self.num_heads, self.mlp_dim, dtype=self.dtype, name=f'block{i}')(x, mask)
    return nn.LayerNorm(dtype=self.dtype, name='norm')(x) if self.final_norm else x


POOLS = ('cls', 'gap')  # config.model.image.pool.


class ViT(nn.Module):
  """Images [B, H, W, 3] float -> pooled [B, width] and the patch tokens [B, patches, width].

  pool 'cls': a learned [CLS] token is prepended and its output is the pooled feature (ViT, CLIP). 'gap':
  no [CLS]; the pooled feature is the mean of the patch outputs (big_vision's SigLIP). Without the extra
  token a 224 px / 16 px image is 196 tokens, an even length, which GPU flash attention (cuDNN) takes.

  With `patch_mask` (bool [B, patches], for masked vision modeling) the masked patches' embeddings are
  replaced by a learned [MASK] embedding, as in BEiT; the module then needs `masked_patches=True`.
  """
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  masked_patches: bool = False
  remat: str = 'none'  # Encoder.remat.
  scan_layers: bool = False  # Encoder.scan_layers.
  pool: str = 'cls'  # One of POOLS.

  @nn.compact
  def __call__(self, images, patch_mask=None):
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype, name='patch_embed')(images)
    batch, grid_h, grid_w, _ = x.shape
    x = x.reshape(batch, grid_h * grid_w, self.width)
    if self.masked_patches:
      mask_token = self.param('mask_token', nn.initializers.normal(0.02), (1, 1, self.width))
      if patch_mask is not None:
        x = jnp.where(patch_mask[..., None], mask_token.astype(x.dtype), x)
    if self.pool == 'cls':
      cls = self.param('cls', nn.initializers.zeros, (1, 1, self.width))
      x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)).astype(x.dtype), x], axis=1)
    pos = self.param('pos_embedding', nn.initializers.normal(0.02), (1, x.shape[1], self.width))
    x = x + pos.astype(x.dtype)
    x = Encoder(self.depth, self.num_heads, self.mlp_dim, dtype=self.dtype, remat=self.remat,
                scan_layers=self.scan_layers, name='encoder')(x)
    if self.pool == 'cls':
      return x[:, 0], x[:, 1:]
    return jnp.mean(x, axis=1), x


class TextTransformer(nn.Module):
  """Token ids [B, L] (0 = padding, [CLS] first) -> pooled [B, width] and tokens [B, L, width]."""
  vocab_size: int
  max_len: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  remat: str = 'none'  # Encoder.remat.
  scan_layers: bool = False  # Encoder.scan_layers.

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                     name='token_embedding')
    x = embed(tokens).astype(self.dtype)
    pos = self.param('pos_embedding', nn.initializers.normal(0.02), (1, self.max_len, self.width))
    x = x + pos[:, :tokens.shape[1]].astype(x.dtype)
    mask = nn.make_attention_mask(tokens != 0, tokens != 0, dtype=jnp.bool_)  # [B, 1, L, L]
    x = Encoder(self.depth, self.num_heads, self.mlp_dim, dtype=self.dtype, remat=self.remat,
                scan_layers=self.scan_layers, name='encoder')(x, mask)
    return x[:, 0], x

  def attend(self, states: jnp.ndarray) -> jnp.ndarray:
    """Token states [..., width] -> float32 vocabulary logits [..., vocab], through the input embedding (tied)."""
    embedding = self.variables['params']['token_embedding']['embedding']
    return jnp.matmul(states, embedding.T.astype(states.dtype), preferred_element_type=jnp.float32)


def preprocess_images(images: jnp.ndarray, image_size: int) -> jnp.ndarray:
  """uint8 [..., H, W, 3] (images [B, H, W, 3], clips [B, T, H, W, 3]) -> float32 [..., image_size, image_size, 3]
  in [-1, 1]."""
  x = images.astype(jnp.float32) / 127.5 - 1.0
  if x.shape[-3:-1] != (image_size, image_size):
    x = jax.image.resize(x, x.shape[:-3] + (image_size, image_size, 3), 'bilinear')
  return x
