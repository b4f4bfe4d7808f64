"""BERT-architecture text tower: post-LayerNorm blocks, so that a BERT-base checkpoint fits it.

`config.model.text.architecture = 'bert'` picks it instead of encoders.TextTransformer (pre-LN); it has
the same interface, and `pretrained.load_bert_checkpoint` fills it from Google's TF BERT checkpoints.
Differences from BERT, all of them neutral to a loaded checkpoint:
- One segment: the token-type embedding of type 0 is kept (a [width] vector added to every token).
- No pooler: the [CLS] state is the pooled output, as ALBEF does; the nested head projects it anyway, and
  BERT's pooler (dense + tanh) was trained for next-sentence prediction. The checkpoint's pooler is unused.
- No dropout, like the rest of the model.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from hivlp_jax.models import encoders

Dtype = Any
LAYER_NORM_EPSILON = 1e-12  # BERT's; flax's default is 1e-6.
_init = nn.initializers.truncated_normal(0.02)  # BERT's initializer_range.


class BertBlock(nn.Module):
  """Post-LayerNorm Transformer block: x = LN(x + attention(x)); x = LN(x + mlp(x))."""
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    width = x.shape[-1]
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype, kernel_init=_init,
                                        attention_fn=encoders.dot_product_attention,
                                        name='attention')(x, x, mask=mask)
    x = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=self.dtype, name='attention_norm')(x + y)
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=_init, name='intermediate')(x)
    # The tanh approximation, as google-research/bert's modeling.py (Hugging Face uses erf; < 1e-3 apart).
    y = nn.Dense(width, dtype=self.dtype, kernel_init=_init, name='output')(nn.gelu(y))
    return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=self.dtype, name='output_norm')(x + y)


class BertTextTransformer(encoders.TextTransformer):
  """Token ids [B, L] (0 = padding, [CLS] first) -> pooled [B, width] ([CLS] state) and tokens [B, L, width].

  The constructor arguments, outputs and the tied `attend` are those of encoders.TextTransformer.
  """

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(self.vocab_size, self.width, embedding_init=_init, name='token_embedding')
    x = embed(tokens)
    pos = self.param('pos_embedding', _init, (1, self.max_len, self.width))
    type_embedding = self.param('type_embedding', _init, (self.width,))  # Token type 0: one segment.
    x = x + pos[:, :tokens.shape[1]] + type_embedding
    x = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=self.dtype, name='embedding_norm')(x).astype(self.dtype)
    # Padding is masked as keys only (BERT's attention mask): every query row, padding too, stays defined.
    mask = (tokens != 0)[:, None, None, :]  # [B, 1 (heads), 1 (queries), L (keys)]
    # Post-LN blocks end normalised: no final LayerNorm.
    x = encoders.Encoder(self.depth, self.num_heads, self.mlp_dim, dtype=self.dtype, block=BertBlock,
                         final_norm=False, remat=self.remat, scan_layers=self.scan_layers, name='encoder')(x, mask)
    return x[:, 0], x
