"""Loading public checkpoints: a ViT `.npz` into the image tower, a TF or Hugging Face BERT checkpoint into the
'bert' text tower."""

import json
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from hivlp_jax import errors
from hivlp_jax.models import pretrained
from hivlp_jax.models import encoders
from hivlp_jax.models import hf_weights


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


def _hf_vit(arrays):
  """The .npz `arrays` of `_checkpoint` in Hugging Face's ViT layout (google/vit-base-patch16-224-in21k)."""
  out = {}
  for name, value in arrays.items():
    width = arrays['embedding/bias'].shape[0]
    if name == 'cls':
      out['vit.embeddings.cls_token'] = value
    elif name.startswith('Transformer/posembed_input'):
      out['vit.embeddings.position_embeddings'] = value
    elif name.startswith('embedding/'):
      kind = name.split('/')[1]
      out[f'vit.embeddings.patch_embeddings.projection.{"weight" if kind == "kernel" else "bias"}'] = (
          value.transpose(3, 2, 0, 1) if kind == 'kernel' else value)
    elif name.startswith('head/'):
      out[f'classifier.{"weight" if name.endswith("kernel") else "bias"}'] = value.T if value.ndim == 2 else value
    else:
      parts = name.split('/')
      leaf = {'scale': 'weight', 'kernel': 'weight', 'bias': 'bias'}[parts[-1]]
      if parts[1] == 'encoder_norm':
        out[f'vit.layernorm.{leaf}'] = value
        continue
      layer = f'vit.encoder.layer.{parts[1].split("_")[1]}'
      module = {'LayerNorm_0': 'layernorm_before', 'LayerNorm_2': 'layernorm_after',
                'MlpBlock_3/Dense_0': 'intermediate.dense', 'MlpBlock_3/Dense_1': 'output.dense',
                'MultiHeadDotProductAttention_1/out': 'attention.output.dense'}.get(
                    '/'.join(parts[2:-1]), f'attention.attention.{parts[3]}')
      if leaf == 'weight' and parts[-1] == 'kernel':
        value = value.reshape(width, -1).T if value.shape[0] == width else value.reshape(-1, width).T
      elif leaf == 'bias':
        value = value.reshape(-1)
      out[f'{layer}.{module}.{leaf}'] = value
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def test_a_hugging_face_vit_folder_loads_exactly_like_the_npz(tmp_path):
  arrays = _checkpoint(np.random.default_rng(4))
  np.savez(tmp_path / 'vit.npz', **arrays)
  (tmp_path / 'hf').mkdir()
  safetensors.numpy.save_file(_hf_vit(arrays), str(tmp_path / 'hf' / 'model.safetensors'))
  _, params = _vit_params()
  from_npz, npz_report = pretrained.load_vit_npz(str(tmp_path / 'vit.npz'), params)
  from_hf, hf_report = pretrained.load_vit_npz(str(tmp_path / 'hf'), params)
  assert sorted(hf_report.loaded) == sorted(npz_report.loaded) and hf_report.left_new == npz_report.left_new
  assert sorted(hf_report.unused) == ['classifier.bias', 'classifier.weight']
  jax.tree.map(np.testing.assert_array_equal, from_hf, from_npz)


def _vit_params(width=64):
  vit = encoders.ViT(patch_size=8, width=width, depth=2, num_heads=2, mlp_dim=128)
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
  from hivlp_jax import train_step  # pylint: disable=g-import-not-at-top
  from tests.conftest import tiny_config  # pylint: disable=g-import-not-at-top
  checkpoint = _checkpoint(np.random.default_rng(1))
  np.savez(tmp_path / 'vit.npz', **checkpoint)
  config = tiny_config(data_dir)
  config.model.image.init_checkpoint = str(tmp_path / 'vit.npz')
  state = train_step.create_train_state(config, train_step.create_model(config, vocab_size=50), jax.random.key(0))
  np.testing.assert_array_equal(state.params['image_tower']['cls'], checkpoint['cls'])
  assert 'text_tower' in state.params


# BERT: Google's TF checkpoint layout, into the 'bert' text tower.

from hivlp_jax import config_lib  # pylint: disable=g-import-not-at-top,g-bad-import-order
from hivlp_jax.models import bert  # pylint: disable=g-import-not-at-top,g-bad-import-order
import tensorflow as tf  # pylint: disable=g-import-not-at-top,g-bad-import-order

BERT_UNUSED = ['bert/pooler/dense/bias', 'bert/pooler/dense/kernel', 'cls/predictions/output_bias', 'global_step']


def _bert_checkpoint(rng, vocab=30, positions=12, width=16, depth=2, mlp=32):
  """Arrays named and shaped as in Google's released bert_model.ckpt (a tiny size), with its extra variables."""
  shapes = {'bert/embeddings/word_embeddings': (vocab, width),
            'bert/embeddings/position_embeddings': (positions, width),
            'bert/embeddings/token_type_embeddings': (2, width),
            'bert/pooler/dense/kernel': (width, width), 'bert/pooler/dense/bias': (width,),
            'cls/predictions/output_bias': (vocab,)}
  norms = ['bert/embeddings/LayerNorm']
  for i in range(depth):
    layer = f'bert/encoder/layer_{i}'
    for dense, (fan_in, fan_out) in {'attention/self/query': (width, width), 'attention/self/key': (width, width),
                                     'attention/self/value': (width, width), 'attention/output/dense': (width, width),
                                     'intermediate/dense': (width, mlp), 'output/dense': (mlp, width)}.items():
      shapes.update({f'{layer}/{dense}/kernel': (fan_in, fan_out), f'{layer}/{dense}/bias': (fan_out,)})
    norms += [f'{layer}/attention/output/LayerNorm', f'{layer}/output/LayerNorm']
  arrays = {name: (0.3 * rng.normal(size=shape)).astype(np.float32) for name, shape in shapes.items()}
  for norm in norms:
    arrays[f'{norm}/gamma'] = (1 + 0.1 * rng.normal(size=width)).astype(np.float32)
    arrays[f'{norm}/beta'] = (0.1 * rng.normal(size=width)).astype(np.float32)
  return arrays


def _write_bert_checkpoint(folder, arrays, num_heads=None) -> str:
  """Writes `arrays` as folder/bert_model.ckpt.{index,data-00000-of-00001} (+ bert_config.json); the prefix."""
  folder.mkdir(exist_ok=True)
  prefix = str(folder / 'bert_model.ckpt')
  tensors = {**arrays, 'global_step': np.int64(1_000_000)}
  tf.raw_ops.SaveV2(prefix=prefix, tensor_names=list(tensors), shape_and_slices=[''] * len(tensors),
                    tensors=[tf.constant(v) for v in tensors.values()])
  if num_heads:
    (folder / 'bert_config.json').write_text(f'{{"num_attention_heads": {num_heads}, "hidden_act": "gelu"}}')
  return prefix


def _bert_tower(vocab=30, max_len=8, width=16, depth=2, num_heads=2, mlp=32):
  """The tower and its params, zeros of the initialised shapes (eval_shape: the loaders need no values)."""
  tower = bert.BertTextTransformer(vocab, max_len, width, depth, num_heads, mlp)
  shapes = jax.eval_shape(tower.init, jax.random.key(0), jnp.ones((1, max_len), jnp.int32))['params']
  return tower, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _numpy_bert(arrays, tokens, num_heads):
  """Post-LN BERT on token ids [B, L] (one segment), straight from the checkpoint's arrays -> [B, L, W]."""
  def norm(x, name):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-12) * arrays[f'{name}/gamma'] + arrays[f'{name}/beta']

  def dense(x, name):
    return x @ arrays[f'{name}/kernel'] + arrays[f'{name}/bias']

  def heads(x):  # [B, L, W] -> [B, heads, L, head_dim]
    return x.reshape(*x.shape[:2], num_heads, -1).transpose(0, 2, 1, 3)

  e = 'bert/embeddings'
  x = (arrays[f'{e}/word_embeddings'][tokens] + arrays[f'{e}/position_embeddings'][:tokens.shape[1]]
       + arrays[f'{e}/token_type_embeddings'][0])
  x = norm(x, f'{e}/LayerNorm')
  key_bias = np.where(tokens != 0, 0.0, -1e9)[:, None, None, :]
  for i in range(sum(n.endswith('/attention/self/query/kernel') for n in arrays)):
    layer = f'bert/encoder/layer_{i}'
    q, k, v = (heads(dense(x, f'{layer}/attention/self/{n}')) for n in ('query', 'key', 'value'))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]) + key_bias
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    context = (probs / probs.sum(-1, keepdims=True)) @ v  # [B, heads, L, head_dim]
    context = context.transpose(0, 2, 1, 3).reshape(x.shape)
    x = norm(x + dense(context, f'{layer}/attention/output/dense'), f'{layer}/attention/output/LayerNorm')
    h = dense(x, f'{layer}/intermediate/dense')
    h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))  # google-research/bert's gelu.
    x = norm(x + dense(h, f'{layer}/output/dense'), f'{layer}/output/LayerNorm')
  return x


def test_bert_checkpoint_fills_the_tower_which_then_computes_bert(tmp_path):
  arrays = _bert_checkpoint(np.random.default_rng(0))
  _write_bert_checkpoint(tmp_path / 'uncased_tiny', arrays, num_heads=2)
  tower, params = _bert_tower()
  # The folder works as well as the prefix.
  loaded, report = pretrained.load_bert_checkpoint(str(tmp_path / 'uncased_tiny'), params)
  assert report.left_new == [] and report.unused == BERT_UNUSED
  assert sorted(report.loaded) == sorted('/'.join(k) for k in flax.traverse_util.flatten_dict(params))
  assert report.reshaped == ['pos_embedding (12, 16) -> (1, 8, 16): the first 8 positions',
                             'type_embedding (2, 16) -> (16,): token type 0']
  attention = loaded['encoder']['block1']['attention']
  assert attention['query']['kernel'].shape == (16, 2, 8) and attention['out']['kernel'].shape == (2, 8, 16)
  np.testing.assert_array_equal(attention['key']['bias'].reshape(-1),
                                arrays['bert/encoder/layer_1/attention/self/key/bias'])
  tokens = np.array([[2, 5, 7, 3, 0, 0, 0, 0], [2, 9, 9, 9, 11, 12, 13, 3]], np.int32)
  for length in (8, 6):  # The full max_len, and shorter texts.
    pooled, states = tower.apply({'params': loaded}, tokens[:, :length])
    expected = _numpy_bert(arrays, tokens[:, :length], num_heads=2)
    np.testing.assert_allclose(states, expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(pooled, states[:, 0])
  logits = tower.apply({'params': loaded}, states, method=tower.attend)  # Tied: the input embedding.
  np.testing.assert_allclose(logits, expected @ arrays['bert/embeddings/word_embeddings'].T, atol=1e-3, rtol=1e-4)


def test_bert_checkpoint_of_another_vocabulary_or_depth_is_reported(tmp_path):
  arrays = _bert_checkpoint(np.random.default_rng(1))
  prefix = _write_bert_checkpoint(tmp_path / 'bert', arrays)
  word = arrays['bert/embeddings/word_embeddings']
  # A larger vocabulary (the checkpoint's, extended at the end) and one more block than the checkpoint.
  _, params = _bert_tower(vocab=40, depth=3)
  loaded, report = pretrained.load_bert_checkpoint(prefix, params)
  assert ('token_embedding/embedding (30, 16) -> (40, 16): the first 30 rows copied, rows 30.. left new'
          in report.reshaped)
  assert report.left_new == sorted(f'encoder/block2/{n}' for n in (
      'attention/query/kernel', 'attention/query/bias', 'attention/key/kernel', 'attention/key/bias',
      'attention/value/kernel', 'attention/value/bias', 'attention/out/kernel', 'attention/out/bias',
      'attention_norm/scale', 'attention_norm/bias', 'intermediate/kernel', 'intermediate/bias',
      'output/kernel', 'output/bias', 'output_norm/scale', 'output_norm/bias'))
  embedding = loaded['token_embedding']['embedding']
  np.testing.assert_array_equal(embedding[:30], word)
  np.testing.assert_array_equal(embedding[30:], params['token_embedding']['embedding'][30:])
  # A smaller vocabulary and a truncated BERT (ALBEF's text encoder keeps BERT's first layers).
  _, params = _bert_tower(vocab=20, depth=1)
  loaded, report = pretrained.load_bert_checkpoint(prefix + '.index', params)
  assert 'token_embedding/embedding (30, 16) -> (20, 16): the first 20 rows copied' in report.reshaped
  assert report.left_new == [] and len(report.unused) == len(BERT_UNUSED) + 16
  assert all(n.startswith('bert/encoder/layer_1/') for n in report.unused if n not in BERT_UNUSED)
  np.testing.assert_array_equal(loaded['token_embedding']['embedding'], word[:20])


def test_bert_checkpoint_errors_name_the_problem(tmp_path):
  arrays = _bert_checkpoint(np.random.default_rng(2))
  prefix = _write_bert_checkpoint(tmp_path / 'bert', arrays, num_heads=2)
  _, params = _bert_tower()
  with pytest.raises(FileNotFoundError,
                     match=r"No BERT checkpoint at '.*missing': found no .*missing\.index \(TF\) nor model.safetensors"):
    pretrained.load_bert_checkpoint(str(tmp_path / 'missing'), params)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match=r'found no .*empty/bert_model\.ckpt\.index \(TF\) nor '
                                              r'model.safetensors \(Hugging Face\)\. Give the checkpoint prefix'):
    pretrained.load_bert_checkpoint(str(tmp_path / 'empty'), params)
  pre_ln = encoders.TextTransformer(30, 8, 16, 2, 2, 32)
  pre_ln_params = jax.eval_shape(pre_ln.init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))['params']
  with pytest.raises(ValueError, match="fits only the BERT text tower: set config.model.text.architecture='bert'"):
    pretrained.load_bert_checkpoint(prefix, pre_ln_params)
  with pytest.raises(ValueError, match=r'has 12 positions, fewer than .*max_len=16'):
    pretrained.load_bert_checkpoint(prefix, _bert_tower(max_len=16)[1])
  with pytest.raises(ValueError, match='num_attention_heads=2 but the text tower has 4 heads'):
    pretrained.load_bert_checkpoint(prefix, _bert_tower(num_heads=4)[1])
  with pytest.raises(ValueError, match=r'intermediate/dense/bias .* has shape \(32,\), the model wants \(64,\)'):
    pretrained.load_bert_checkpoint(prefix, _bert_tower(mlp=64)[1])


def test_bert_tower_trains_inside_two_towers_with_mlm_from_the_configured_checkpoint(tmp_path):
  from hivlp_jax import train_step  # pylint: disable=g-import-not-at-top
  from tests.conftest import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config('unused')
  config.model.image.depth = 1
  config.model.text.update(dict(architecture='bert', depth=1, max_len=8))
  config.mvlm.mlm_weight = 1.0
  arrays = _bert_checkpoint(np.random.default_rng(3), vocab=50, width=64, depth=1, mlp=128)
  config.model.text.init_checkpoint = _write_bert_checkpoint(tmp_path / 'bert', arrays, num_heads=2)
  config_lib.validate(config)
  model = train_step.create_model(config, vocab_size=50)
  state = train_step.create_train_state(config, model, jax.random.key(0))
  text_tower = state.params['text_tower']
  np.testing.assert_array_equal(text_tower['token_embedding']['embedding'], arrays['bert/embeddings/word_embeddings'])
  np.testing.assert_array_equal(text_tower['encoder']['block0']['output_norm']['scale'],
                                arrays['bert/encoder/layer_0/output/LayerNorm/gamma'])
  texts = np.array([[2, 7, 8, 9, 3, 0, 0, 0]] * 2, np.int32)
  masked = texts.copy()
  masked[:, 2] = 4

  def mlm_logit_sum(params):
    outputs = model.apply({'params': params}, np.zeros((2, 32, 32, 3), np.uint8), texts, masked_texts=masked)
    assert outputs.mlm_logits.shape == (2, 8, 50)
    return outputs.mlm_logits[:, 2, 40].sum()

  grads = jax.jit(jax.grad(mlm_logit_sum))(state.params)
  # Token 40 is in no input: its embedding row gets a gradient only through `attend`, the tied output.
  assert np.abs(grads['text_tower']['token_embedding']['embedding'][40]).max() > 0


def test_text_tower_config_is_validated(tmp_path):
  from tests.conftest import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config('unused')
  config.model.text.architecture = 'post_ln'
  with pytest.raises(ValueError, match=r"config.model.text.architecture='post_ln' is not one of \('pre_ln', 'bert'\)"):
    config_lib.validate(config)
  folder = tmp_path / 'bert'
  config.model.text.update(dict(architecture='pre_ln', init_checkpoint=str(folder)))
  with pytest.raises(ValueError, match="fits only config.model.text.architecture='bert' \\(not 'pre_ln'\\)"):
    config_lib.validate(config)
  config.model.text.architecture = 'bert'
  with pytest.raises(ValueError, match='config.model.text.init_checkpoint: No BERT checkpoint at'):
    config_lib.validate(config)
  _write_bert_checkpoint(folder, {'bert/embeddings/word_embeddings': np.zeros((3, 4), np.float32)})
  (folder / 'vocab.txt').write_text('[PAD]\n[UNK]\n[CLS]\n')
  with pytest.raises(ValueError, match='with an empty config.data.vocab_file'):
    config_lib.validate(config)
  (tmp_path / 'vocab.txt').write_text('[PAD]\n[CLS]\n[UNK]\n')
  config.data.vocab_file = str(tmp_path / 'vocab.txt')
  with pytest.raises(ValueError, match='the token ids would index the wrong rows'):
    config_lib.validate(config)
  (tmp_path / 'vocab.txt').write_text('[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nextra\n')
  config_lib.validate(config)


def test_scanned_towers_load_both_checkpoints_block_by_block(tmp_path):
  """With config.model.scan_layers (params stacked [depth, ...]) both loaders fill the same function."""
  arrays = _bert_checkpoint(np.random.default_rng(4))
  prefix = _write_bert_checkpoint(tmp_path / 'bert', arrays, num_heads=2)
  tower = bert.BertTextTransformer(30, 8, 16, 2, 2, 32, remat='block', scan_layers=True)
  shapes = jax.eval_shape(tower.init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))['params']
  loaded, report = pretrained.load_bert_checkpoint(prefix, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))
  assert report.left_new == [] and 'encoder/block1/attention/query/kernel' in report.loaded
  assert loaded['encoder']['blocks']['attention']['query']['kernel'].shape == (2, 16, 2, 8)
  tokens = np.array([[2, 5, 7, 3, 0, 0, 0, 0], [2, 9, 9, 9, 11, 12, 13, 3]], np.int32)
  np.testing.assert_allclose(jax.jit(tower.apply)({'params': loaded}, tokens)[1],
                             _numpy_bert(arrays, tokens, num_heads=2), atol=1e-4, rtol=1e-4)
  np.savez(tmp_path / 'vit.npz', **_checkpoint(np.random.default_rng(5)))
  vit = encoders.ViT(patch_size=8, width=64, depth=2, num_heads=2, mlp_dim=128)
  shapes = jax.eval_shape(vit.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  vit_params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  expected, _ = pretrained.load_vit_npz(str(tmp_path / 'vit.npz'), vit_params)
  loaded, report = pretrained.load_vit_npz(str(tmp_path / 'vit.npz'), encoders.stack_layers(vit_params))
  assert report.left_new == [] and 'blocks' in loaded['encoder']
  scanned_vit = encoders.ViT(patch_size=8, width=64, depth=2, num_heads=2, mlp_dim=128, scan_layers=True)
  images = np.random.default_rng(6).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_allclose(jax.jit(scanned_vit.apply)({'params': loaded}, images)[0],
                             jax.jit(vit.apply)({'params': expected}, images)[0], atol=1e-4, rtol=1e-4)


def _hf_name(tf_name: str) -> str:
  """The inverse of pretrained.hf_bert_name: the name Hugging Face's bert-base-uncased uses."""
  if not tf_name.startswith('bert/'):
    return tf_name.replace('/', '.')
  name = re.sub(r'/layer_(\d+)/', r'/layer/\1/', tf_name).replace('/', '.')
  for old, new in (('.gamma', '.weight'), ('.beta', '.bias'), ('.kernel', '.weight')):
    if name.endswith(old):
      return name[:-len(old)] + new
  return name + '.weight' if name.endswith('_embeddings') else name


def _write_hf_bert(folder, arrays, num_heads=2):
  """`arrays` (TF names) as a Hugging Face folder: model.safetensors (dense weights [out, in]) + config.json."""
  folder.mkdir(exist_ok=True)
  tensors = {_hf_name(n): np.ascontiguousarray(v.T if n.endswith('/kernel') else v) for n, v in arrays.items()}
  safetensors.numpy.save_file(tensors, str(folder / 'model.safetensors'))
  (folder / 'config.json').write_text(json.dumps({'num_attention_heads': num_heads, 'hidden_act': 'gelu',
                                                  'model_type': 'bert'}))
  return tensors


def test_a_hugging_face_bert_folder_fills_the_tower_which_then_computes_bert(tmp_path):
  arrays = _bert_checkpoint(np.random.default_rng(3))
  tensors = _write_hf_bert(tmp_path / 'bert-base-uncased', arrays)
  assert 'bert.encoder.layer.1.attention.self.query.weight' in tensors  # The published layout.
  assert all(hf_weights.bert_name(_hf_name(n)) == n for n in arrays if n.startswith('bert/'))
  tower, params = _bert_tower()
  loaded, report = pretrained.load_bert_checkpoint(str(tmp_path / 'bert-base-uncased'), params)
  assert report.left_new == [] and sorted(report.loaded) == sorted(
      '/'.join(k) for k in flax.traverse_util.flatten_dict(params))
  tokens = np.array([[2, 5, 7, 3, 0, 0, 0, 0], [2, 9, 9, 9, 11, 12, 13, 3]], np.int32)
  _, states = tower.apply({'params': loaded}, tokens)
  np.testing.assert_allclose(states, _numpy_bert(arrays, tokens, num_heads=2), atol=1e-4, rtol=1e-4)

  del arrays['bert/encoder/layer_1/output/dense/bias']  # A missing key is named, and left as initialised.
  _write_hf_bert(tmp_path / 'missing', arrays)
  _, report = pretrained.load_bert_checkpoint(str(tmp_path / 'missing'), params)
  assert report.left_new == ['encoder/block1/output/bias']
  _write_hf_bert(tmp_path / 'heads', arrays, num_heads=4)
  with pytest.raises(errors.InputError, match='config.json has num_attention_heads=4 but the text tower has 2'):
    pretrained.load_bert_checkpoint(str(tmp_path / 'heads'), params)
  (tmp_path / 'missing' / 'model.safetensors').write_bytes(b'not safetensors')
  with pytest.raises(errors.InputError, match='model.safetensors is not a readable safetensors file'):
    pretrained.load_bert_checkpoint(str(tmp_path / 'missing'), params)


def test_position_embeddings_fit_models_pooled_with_or_without_cls():
  """A [CLS] checkpoint into a 'gap' ViT drops the [CLS] row; the other way a zero row is added; grids resize."""
  posemb = np.random.default_rng(0).normal(size=(1, 1 + 16, 4)).astype(np.float32)
  np.testing.assert_allclose(pretrained.resize_position_embedding(posemb, 16), posemb[:, 1:], atol=1e-6)
  assert pretrained.resize_position_embedding(posemb, 4).shape == (1, 4, 4)
  back = pretrained.resize_position_embedding(posemb[:, 1:], 1 + 16)
  np.testing.assert_array_equal(back[:, 0], 0.0)
  np.testing.assert_allclose(back[:, 1:], posemb[:, 1:], atol=1e-6)
  with pytest.raises(ValueError, match='not square grids'):
    pretrained.resize_position_embedding(posemb, 1 + 5)
