"""The query tool on a tiny trained run: end to end, saved index reuse and rebuild, two-stage vs exact."""

import io
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

from hivlp_jax import config_lib
from hivlp_jax import evaluate
from hivlp_jax import index_store
from hivlp_jax import query
from hivlp_jax import retrieval
from hivlp_jax import train
from hivlp_jax.data import pipeline
from tests.conftest import tiny_config

TEXT = 'a small red circle in the top left'
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data_dir):
  config = tiny_config(data_dir)
  config.num_train_steps = 151
  config.optimizer.warmup_steps = 20
  config.checkpoint_every_steps = 150
  config.log_every_steps = 50
  return config


@pytest.fixture(scope='module')
def run_dir(data_dir, tmp_path_factory):
  """A tiny run trained for 150 steps (of 151: stopping early skips the final evaluation, not needed here)."""
  workdir = str(tmp_path_factory.mktemp('query_run'))
  assert train.train_and_evaluate(_config(data_dir), workdir, stop_after_step=150) is None
  return workdir


def _cosines(queries, gallery, indices):
  """Full-dim cosine of each query [Q, D] with its gallery items indices [Q, k] -> [Q, k]."""
  q = retrieval.normalized_prefix_np(queries, queries.shape[1])
  g = retrieval.normalized_prefix_np(gallery, gallery.shape[1])
  return np.sum(q[:, None] * g[indices], axis=-1)


def test_config_is_rebuilt_from_the_workdir(run_dir, data_dir):
  rebuilt = query.config_from_workdir(run_dir)
  assert config_lib.flatten(rebuilt) == config_lib.flatten(_config(data_dir))
  assert rebuilt.model.nested_dims == (8, 16, 32, 64) and rebuilt.eval.two_stage == ((32, 50),)
  bad = _config(data_dir)
  bad.model.embed_dim = 32
  with pytest.raises(ValueError, match='model.embed_dim'):
    query.load_config(run_dir, bad)


def test_text_query_prints_hits_and_writes_sheet_and_page(run_dir, tmp_path, capsys):
  sheet, page = str(tmp_path / 'sheet.png'), str(tmp_path / 'page.html')
  result, = query.query(run_dir, texts=[TEXT], k=5, contact_sheet_path=sheet, html_path=page, tile=96)
  printed = capsys.readouterr().out
  assert TEXT in printed and 'top 5 of 64 test images at step 150' in printed
  hit_lines = [line for line in printed.splitlines() if line.lstrip()[:2] in {f'{r}.' for r in range(1, 6)}]
  assert len(hit_lines) == 5 and all('image ' in line for line in hit_lines)

  hits = result.hits
  assert [h.rank for h in hits] == [1, 2, 3, 4, 5] and len({h.index for h in hits}) == 5
  scores = np.array([h.score for h in hits])
  assert np.all(np.diff(scores) <= 0)
  # The scores are the full-dim cosines with the saved gallery embeddings, and each label is the
  # image's first caption.
  embeddings = np.load(os.path.join(result.index.directory, index_store.EMBEDDINGS))
  indices = np.array([[h.index for h in hits]])
  np.testing.assert_allclose(scores, _cosines(result.query_embedding[None], embeddings, indices)[0], atol=1e-5)
  assert all(h.label == result.gallery.labels[h.index] for h in hits)

  with Image.open(sheet) as image:
    assert image.format == 'PNG'
    assert image.size == query.sheet_size(1, 5, 96) == (4 + 5 * (96 + 4), 4 + 16 + 14 + 96 + 4)
    pixels = np.asarray(image.convert('RGB'))
  for column, hit in enumerate(hits):  # Each tile is its image, upscaled.
    x, y = query.tile_origin(0, column, 96)
    expected = np.asarray(query.resize_tile(result.gallery.images[hit.index], 96))
    np.testing.assert_array_equal(pixels[y:y + 96, x:x + 96], expected)
  with open(page, encoding='utf-8') as f:
    text = f.read()
  assert text.count('data:image/png;base64,') == 5 and TEXT in text


def test_image_query_finds_captions(run_dir, data_dir, tmp_path, capsys):
  config = _config(data_dir)
  data = pipeline.load_split(config, 'test', pipeline.get_tokenizer(config))
  path = str(tmp_path / 'scene.png')
  Image.fromarray(data.images[7]).save(path)
  sheet = str(tmp_path / 'sheet.png')
  result, = query.query(run_dir, images=[path], k=4, contact_sheet_path=sheet, tile=64)
  assert result.gallery.name == 'test captions' and result.gallery.size == 64 * 5
  assert [h.label for h in result.hits] == [result.gallery.labels[h.index] for h in result.hits]
  assert all(h.label in data.captions[h.index // 5] for h in result.hits)
  printed = capsys.readouterr().out
  assert all(h.label in printed for h in result.hits)
  with Image.open(sheet) as image:
    assert image.size == query.sheet_size(1, 5, 64)  # The query image, then 4 hits.


def _save_perturbed_checkpoint(workdir, config):
  """Saves the latest state again as step + 1 with slightly changed parameters."""
  model = train.create_model(config, pipeline.get_tokenizer(config).vocab_size)
  state = query.restore_state(workdir, config, model)
  params = jax.tree.map(lambda x: x * 1.01, state.params)
  manager = train.checkpoint_manager(workdir, config)
  step = int(state.step) + 1
  manager.save(step, args=ocp.args.StandardSave(state.replace(step=state.step + 1, params=params)))
  manager.wait_until_finished()
  return step


def test_second_query_reuses_the_index_and_a_new_checkpoint_rebuilds_it(run_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(run_dir, workdir)
  shutil.rmtree(os.path.join(workdir, query.INDEX_DIR), ignore_errors=True)
  first, = query.query(workdir, texts=[TEXT], k=3, out=io.StringIO())
  assert first.index.rebuilt and first.index.embedded
  assert first.index.directory == os.path.join(workdir, 'indexes', 'test-dim32')
  manifest = index_store.read_manifest(first.index.directory)
  assert manifest['step'] == 150 and manifest['shape'] == [64, 64]

  second, = query.query(workdir, texts=['a large blue square at the bottom'], k=3, out=io.StringIO())
  assert not second.index.rebuilt and not second.index.embedded
  assert index_store.read_manifest(first.index.directory) == manifest

  step = _save_perturbed_checkpoint(workdir, query.config_from_workdir(workdir))
  third, = query.query(workdir, texts=[TEXT], k=3, out=io.StringIO())
  assert third.step == step == 151
  assert third.index.rebuilt and third.index.embedded
  reasons = third.index.stale_reasons
  assert any(reason.startswith('step: saved 150') for reason in reasons), reasons
  assert index_store.read_manifest(first.index.directory)['step'] == 151


def test_truncate_backend_and_a_backend_change(run_dir, tmp_path):
  """--backend=truncate serves the gallery from ScaNN's truncate mode; asking for the other backend
  rebuilds the saved index (its embeddings are reused) and gives the same top hits."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(run_dir, workdir)
  shutil.rmtree(os.path.join(workdir, query.INDEX_DIR), ignore_errors=True)
  out = io.StringIO()
  result, = query.query(workdir, texts=[TEXT], k=3, backend='truncate', out=out)
  found = result.index
  assert found.backend == 'truncate' and isinstance(found.index, retrieval.ScannPrefixIndex)
  assert found.rebuilt and 'truncate' in out.getvalue()
  assert index_store.read_manifest(found.directory)['backend'] == 'truncate'
  embeddings = np.load(os.path.join(found.directory, index_store.EMBEDDINGS))
  indices = np.array([[h.index for h in result.hits]])
  scores = np.array([h.score for h in result.hits])
  np.testing.assert_allclose(scores, _cosines(result.query_embedding[None], embeddings, indices)[0], atol=1e-5)

  run = query.load_run(workdir)
  images, _ = query.split_galleries(run, 'test')
  rerank = query.gallery_index(run, images, 32, 50, backend='rerank')
  assert rerank.rebuilt and not rerank.embedded and rerank.backend == 'rerank'
  assert any(r.startswith("backend: saved 'truncate'") for r in rerank.stale_reasons), rerank.stale_reasons
  assert isinstance(rerank.index, retrieval.CoarseToFineIndex)
  rerank_scores, _ = rerank.index.search(result.query_embedding[None], 3)
  np.testing.assert_allclose(rerank_scores[0], scores, atol=1e-5)
  auto = query.gallery_index(run, images, 32, 50)  # 64 images: below the brute-force threshold.
  assert not auto.rebuilt and auto.backend == 'rerank'


def test_cached_embeddings_need_the_same_step_and_source(tmp_path):
  rng = np.random.default_rng(0)
  embeddings = rng.standard_normal((50, 16)).astype(np.float32)
  directory = str(tmp_path / 'index')
  source = {'inputs': 'abc', 'params': 'def'}
  assert index_store.cached_embeddings(directory, 3, source) is None
  assert index_store.load_or_build(directory, embeddings, 3, coarse_dim=8, shortlist=10, source=source).rebuilt
  np.testing.assert_array_equal(index_store.cached_embeddings(directory, 3, source), embeddings)
  assert index_store.cached_embeddings(directory, 4, source) is None
  assert index_store.cached_embeddings(directory, 3, source | {'params': 'xyz'}) is None
  stored = index_store.load_or_build(directory, embeddings, 3, coarse_dim=8, shortlist=10,
                                     source=source | {'params': 'xyz'})
  assert stored.rebuilt and stored.stale_reasons and stored.stale_reasons[0].startswith('source:')


def test_two_stage_recall_matches_exact_on_trained_embeddings(run_dir):
  """ScaNN over the 16-dim prefixes shortlisting 100 items (all 64 images for text-to-image, 100 of the
  320 captions the other way), re-ranked at 64 dims: the evaluator's two-stage mode gives the exact
  full-dim recall to 0.01 (measured: equal; the shortlists hold every exact top-10 caption)."""
  run = query.load_run(run_dir)
  data = pipeline.load_split(run.config, 'test', run.tokenizer)
  image_emb, text_emb, text_image_ids = evaluate.embed_split(*run.embedders(), data, run.config.eval.batch_size)
  config = run.config
  config.eval.two_stage = ((16, 100),)
  config.eval.funnel = ()
  results = evaluate.evaluate(image_emb, text_emb, text_image_ids, evaluate.modes_from_config(config),
                              config.eval.ks)
  exact, two_stage = results['exact_dim64'], results['two_stage_dim16_k100']
  assert exact['t2i_r10'] > 0.4 and exact['i2t_r10'] > 0.4, exact  # Trained: chance is about 0.16.
  for key in ('i2t_r1', 'i2t_r5', 'i2t_r10', 't2i_r1', 't2i_r5', 't2i_r10'):
    assert abs(two_stage[key] - exact[key]) <= 0.01, (key, exact, two_stage)
  _, exact_top10 = retrieval.exact_top_k(image_emb, text_emb, 10)
  _, shortlists = retrieval.TwoStageSearch(16, 100).build(text_emb).candidates(image_emb)
  assert retrieval.shortlist_recall(shortlists, exact_top10) >= 0.99


def test_command_line(run_dir, tmp_path):
  sheet = str(tmp_path / 'sheet.png')
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  completed = subprocess.run(
      [sys.executable, '-m', 'hivlp_jax.query', f'--workdir={run_dir}', f'--text={TEXT}', '--k=3',
       f'--contact_sheet={sheet}'], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert completed.stdout.count('\n   ') >= 3 and TEXT in completed.stdout
  with Image.open(sheet) as image:
    assert image.size == query.sheet_size(1, 3, 128)
