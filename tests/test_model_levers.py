"""The model's speed and memory levers change nothing computed: fused attention, remat, scanned layers, bf16."""

import functools

import flax.linen as nn
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from hivlp_jax import config_lib
from hivlp_jax import losses
from hivlp_jax import optim
from hivlp_jax.models import encoders
from hivlp_jax.models import two_towers

VOCAB = 50
MAX_LEN = 8
LENGTHS = np.array([8, 5, 1, 3])  # Text lengths with [CLS]; the rest is padding (id 0).


def _texts(max_len=MAX_LEN):
  tokens = np.random.default_rng(1).integers(5, VOCAB, (len(LENGTHS), max_len)).astype(np.int32)
  return np.where(np.arange(max_len)[None] < LENGTHS[:, None], tokens, 0)


def _images():
  return np.random.default_rng(2).integers(0, 256, (len(LENGTHS), 16, 16, 3)).astype(np.uint8)


@pytest.mark.parametrize('mask_kind', ['pre_ln', 'bert'])
def test_dot_product_attention_equals_flax_attention_with_the_padding_mask(mask_kind):
  valid = jnp.asarray(_texts() != 0)
  # The towers' masks: pre-LN masks queries and keys (float, as flax makes it), BERT keys only (bool).
  mask = nn.make_attention_mask(valid, valid) if mask_kind == 'pre_ln' else valid[:, None, None, :]
  x = jax.random.normal(jax.random.key(0), valid.shape + (32,))
  flax_attention = nn.MultiHeadDotProductAttention(num_heads=4)
  ours = nn.MultiHeadDotProductAttention(num_heads=4, attention_fn=encoders.dot_product_attention)
  params = flax_attention.init(jax.random.key(1), x, x, mask=mask)
  assert jax.tree.structure(ours.init(jax.random.key(1), x, x, mask=mask)) == jax.tree.structure(params)

  def loss(module, params):
    return jnp.sum(jnp.sin(module.apply(params, x, x, mask=mask)))

  expected, expected_grads = jax.jit(jax.value_and_grad(lambda p: loss(flax_attention, p)))(params)
  value, grads = jax.jit(jax.value_and_grad(lambda p: loss(ours, p)))(params)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  np.testing.assert_allclose(ours.apply(params, x, x, mask=mask), flax_attention.apply(params, x, x, mask=mask),
                             rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads, expected_grads)


@pytest.fixture
def attention_tried_on_a_gpu_host(monkeypatch):
  """Seen from the CPU as a GPU host: the list of the implementations `jax.nn.dot_product_attention` is asked
  for (a spy that answers each with XLA's, so cuDNN 'works' here and no fallback follows)."""
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(encoders, '_fallbacks_logged', set())
  tried = []
  real = jax.nn.dot_product_attention

  def spy(*args, implementation=None, **kwargs):
    tried.append(implementation)
    return real(*args, implementation='xla', **kwargs)

  monkeypatch.setattr(jax.nn, 'dot_product_attention', spy)
  return tried


def test_xla_attention_keeps_a_gpu_host_from_trying_cudnn(attention_tried_on_a_gpu_host):
  """benchmarks/train_step.py counts FLOPs on a step lowered for the CPU: on a GPU host, the attention traced
  there must not be cuDNN's (no CPU rule). Seen from the CPU as a GPU host: cuDNN is tried, fails and is
  logged outside the block; inside it, XLA attention is used without trying."""
  tried = attention_tried_on_a_gpu_host
  q = jnp.ones((2, 8, 2, 16), jnp.bfloat16)
  encoders.dot_product_attention(q, q, q)
  assert tried == ['cudnn']  # The spy answers for cuDNN on the CPU, so there is no fallback to count.
  tried.clear()
  with encoders.xla_attention():
    encoders.dot_product_attention(q, q, q)
  assert tried == ['xla']


def test_gap_pooling_drops_the_cls_token_for_an_even_length_that_a_gpu_host_sends_to_cudnn(
    attention_tried_on_a_gpu_host):
  """pool 'gap': no [CLS] parameter, position embeddings of the patches only, the pooled feature the mean of
  the patch outputs; at 224 / 16 px that is 196 tokens, which a GPU host sends to cuDNN (197 it cannot)."""
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  vit = encoders.ViT(patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=32, pool='gap')
  params = vit.init(jax.random.key(0), images)['params']
  assert 'cls' not in params and params['pos_embedding'].shape == (1, 16, 16)
  pooled, patches = vit.apply({'params': params}, images)
  assert patches.shape == (2, 16, 16)
  np.testing.assert_allclose(pooled, patches.mean(axis=1), rtol=1e-6, atol=1e-6)
  cls_pooled, cls_patches = encoders.ViT(patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=32).init_with_output(
      jax.random.key(0), images)[0]
  assert cls_pooled.shape == (2, 16) and cls_patches.shape == (2, 16, 16)  # [CLS] pooled, not returned.
  tried = attention_tried_on_a_gpu_host
  tried.clear()  # The ViT's own calls above (17 tokens: XLA) are not under test here.
  for tokens in (196, 197):  # ViT-B/16 at 224 px with 'gap', and with 'cls'.
    q = jnp.ones((1, tokens, 2, 16), jnp.bfloat16)
    encoders.dot_product_attention(q, q, q)
  assert tried == ['cudnn', 'xla']
  with pytest.raises(ValueError, match=r"config.model.image.pool='max' is not one of \('cls', 'gap'\)"):
    config = tiny.get_config()
    config.model.image.pool = 'max'
    config_lib.validate(config)


def _model_config(architecture='pre_ln', remat='none', scan_layers=False, dtype='float32'):
  """16 px images of 4 patches through 1 block, 8 tokens through 2 (the scan must keep their order)."""
  config = tiny.get_config().model
  config.update(dict(image_size=16, embed_dim=32, nested_dims=(16, 32)))
  config.image.update(dict(width=32, mlp_dim=64, depth=1))
  config.text.update(dict(width=32, mlp_dim=64, depth=2, max_len=MAX_LEN, architecture=architecture))
  config.remat, config.scan_layers, config.dtype = remat, scan_layers, dtype
  return config


def _loss_and_grads(model_config, params=None):
  """The in-batch contrastive loss at every nested dim and its gradient; params: None for random ones."""
  model = two_towers.TwoTowers(model_config, vocab_size=VOCAB)
  images, texts = _images(), _texts()
  if params is None:  # Random values of the initialised shapes: no init to compile.
    shapes = jax.eval_shape(model.init, jax.random.key(0), images[:1], texts[:1])['params']
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(s.dtype), shapes)

  def loss(params):
    outputs = model.apply({'params': params}, images, texts)
    pair = losses.Pair(outputs.image, outputs.text)
    return losses.contrastive_loss(pair, pair, pair, outputs.temperature, model_config.nested_dims,
                                   (1.0,) * len(model_config.nested_dims))[0]

  return params, jax.jit(jax.value_and_grad(loss))(params)


@functools.lru_cache()
def _baseline():
  """(params, (loss, grads)) of the model with neither remat nor scan, computed once."""
  return _loss_and_grads(_model_config())


# Each case compiles a step (seconds on CPU): remat outside a scan, and either policy inside one. The scanned
# BERT tower is checked against numpy BERT in test_pretrained.py, and traced in bf16 below.
@pytest.mark.parametrize('remat,scan_layers', [('block', False), ('block_full', True)])
def test_remat_and_scan_give_the_loss_and_gradients_of_neither(remat, scan_layers):
  params, (expected, expected_grads) = _baseline()
  config = _model_config('pre_ln', remat, scan_layers)
  if scan_layers:
    own_params = jax.eval_shape(two_towers.TwoTowers(config, vocab_size=VOCAB).init,
                                jax.random.key(0), _images()[:1], _texts()[:1])['params']
    params = encoders.stack_layers(params)
    # stack_layers makes the tree the scanned model initialises, and unstack_layers undoes it.
    assert jax.tree.map(jnp.shape, own_params) == jax.tree.map(jnp.shape, params)
    assert 'blocks' in own_params['image_tower']['encoder'] and 'blocks' in own_params['text_tower']['encoder']
  _, (value, grads) = _loss_and_grads(config, params)
  if scan_layers:
    grads = encoders.unstack_layers(grads)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  assert jax.tree.structure(grads) == jax.tree.structure(expected_grads)
  # float32 tolerance: XLA may fuse and order the sums differently inside a scan or a remat.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads, expected_grads)


def _primitive_dtypes(jaxpr, name):
  """The input dtypes of every `name` primitive in a jaxpr, nested jaxprs (scan, remat, custom_jvp) included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      found += [v.aval.dtype for v in eqn.invars]
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax_core.ClosedJaxpr):
          found += _primitive_dtypes(sub.jaxpr, name)
        elif isinstance(sub, jax_core.Jaxpr):
          found += _primitive_dtypes(sub, name)
  return found


def test_bfloat16_computes_in_bfloat16_keeps_float32_params_softmax_logits_and_loss():
  config = _model_config('bert', remat='block', scan_layers=True, dtype='bfloat16')
  model = two_towers.TwoTowers(config, vocab_size=VOCAB, mlm=True)
  images, texts = _images(), _texts()
  params = jax.eval_shape(model.init, jax.random.key(0), images[:1], texts[:1], masked_texts=texts[:1])['params']
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}

  def loss(params):
    outputs = model.apply({'params': params}, images, texts, masked_texts=texts)
    assert outputs.image.dtype == outputs.text.dtype == outputs.mlm_logits.dtype == jnp.float32
    pair = losses.Pair(outputs.image, outputs.text)
    return losses.contrastive_loss(pair, pair, pair, outputs.temperature, config.nested_dims,
                                   (1.0,) * len(config.nested_dims))[0]

  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(params).jaxpr
  assert jnp.dtype(jnp.bfloat16) in _primitive_dtypes(jaxpr, 'dot_general')  # The towers run in bf16 ...
  exp_dtypes = _primitive_dtypes(jaxpr, 'exp')  # ... every softmax (attention, loss) in float32.
  assert exp_dtypes and set(exp_dtypes) == {jnp.dtype(jnp.float32)}
  assert jaxpr.outvars[0].aval.dtype == jnp.float32


def test_weight_decay_mask_ignores_the_scan_axis():
  model = two_towers.TwoTowers(_model_config(), vocab_size=VOCAB)
  params = jax.eval_shape(model.init, jax.random.key(0), _images()[:1], _texts()[:1])['params']
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), params)
  unscanned = optim.decay_mask(params)
  assert unscanned['text_tower']['encoder']['block1']['LayerNorm_0']['scale'] is False
  assert optim.decay_mask(encoders.stack_layers(params)) == jax.tree.map(
      lambda m: bool(np.all(m)), encoders.stack_layers(unscanned))


def test_unknown_remat_is_refused_naming_the_field_and_the_choices():
  config = tiny.get_config()  # scan_layers needs no check: the ConfigDict and its flags take only a bool.
  config.model.remat = 'blocks'
  with pytest.raises(ValueError, match=r"config.model.remat='blocks' is not one of \('none', 'block', 'block_full'\)"):
    config_lib.validate(config)
