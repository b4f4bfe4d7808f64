"""The query tool on a tiny trained run: end to end, saved index reuse and rebuild (also of damaged files),
two-stage vs exact, unreadable folder images."""

import io
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from hivlp_jax import checkpointing
from hivlp_jax import coarse_to_fine
from hivlp_jax import config_lib
from hivlp_jax import errors
from hivlp_jax import evaluate
from hivlp_jax import evaluators
from hivlp_jax import gallery as gallery_lib
from hivlp_jax import index_store
from hivlp_jax import query
from hivlp_jax import retrieval
from hivlp_jax import train
from hivlp_jax import train_step
from hivlp_jax.data import pipeline
from tests.conftest import tiny_config
from tests.conftest import workdir_io_guard

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
  with workdir_io_guard(workdir):  # Every file of the run goes through the path layer (object stores).
    assert train.train_and_evaluate(_config(data_dir), workdir, stop_after_step=150) is None
  return workdir


def _cosines(queries, gallery, indices):
  """Full-dim cosine of each query [Q, D] with its gallery items indices [Q, k] -> [Q, k]."""
  q = retrieval.normalized_prefix_np(queries, queries.shape[1])
  g = retrieval.normalized_prefix_np(gallery, gallery.shape[1])
  return np.sum(q[:, None] * g[indices], axis=-1)


def test_config_is_rebuilt_from_the_workdir(run_dir, data_dir):
  rebuilt = gallery_lib.config_from_workdir(run_dir)
  assert config_lib.flatten(rebuilt) == config_lib.flatten(_config(data_dir))
  assert rebuilt.model.nested_dims == (8, 16, 32, 64) and rebuilt.eval.two_stage == ((32, 50),)
  bad = _config(data_dir)
  bad.model.embed_dim = 32
  with pytest.raises(ValueError, match='model.embed_dim'):
    gallery_lib.load_config(run_dir, bad)


def test_text_query_prints_hits_and_writes_sheet_and_page(run_dir, tmp_path, capsys):
  sheet, page = str(tmp_path / 'sheet.png'), str(tmp_path / 'page.html')
  with workdir_io_guard(run_dir):  # The index store too: ScaNN's files are staged, then copied by files.
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
  model = train_step.create_model(config, pipeline.get_tokenizer(config).vocab_size)
  checkpoints = checkpointing.Checkpoints(workdir, config.max_checkpoints_to_keep)
  state = checkpoints.restore_latest(train_step.create_train_state(config, model, jax.random.key(0)))
  params = jax.tree.map(lambda x: x * 1.01, state.params)
  step = int(state.step) + 1
  checkpoints.save(step, state.replace(step=state.step + 1, params=params))
  checkpoints.close()
  return step


def test_second_query_reuses_the_index_and_a_new_checkpoint_rebuilds_it(run_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(run_dir, workdir)
  shutil.rmtree(os.path.join(workdir, gallery_lib.INDEX_DIR), ignore_errors=True)
  first, = query.query(workdir, texts=[TEXT], k=3, out=io.StringIO())
  assert first.index.rebuilt and first.index.embedded
  assert first.index.directory == os.path.join(workdir, 'indexes', 'test-dim32')
  manifest = index_store.read_manifest(first.index.directory)
  assert manifest['step'] == 150 and manifest['shape'] == [64, 64]

  second, = query.query(workdir, texts=['a large blue square at the bottom'], k=3, out=io.StringIO())
  assert not second.index.rebuilt and not second.index.embedded
  assert index_store.read_manifest(first.index.directory) == manifest

  step = _save_perturbed_checkpoint(workdir, gallery_lib.config_from_workdir(workdir))
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
  shutil.rmtree(os.path.join(workdir, gallery_lib.INDEX_DIR), ignore_errors=True)
  out = io.StringIO()
  result, = query.query(workdir, texts=[TEXT], k=3, backend='truncate', out=out)
  found = result.index
  assert found.backend == 'truncate' and isinstance(found.index, coarse_to_fine.ScannPrefixIndex)
  assert found.rebuilt and 'truncate' in out.getvalue()
  assert index_store.read_manifest(found.directory)['backend'] == 'truncate'
  embeddings = np.load(os.path.join(found.directory, index_store.EMBEDDINGS))
  indices = np.array([[h.index for h in result.hits]])
  scores = np.array([h.score for h in result.hits])
  np.testing.assert_allclose(scores, _cosines(result.query_embedding[None], embeddings, indices)[0], atol=1e-5)

  run = gallery_lib.load_run(workdir)
  images, _ = gallery_lib.split_galleries(run, 'test')
  rerank = gallery_lib.gallery_index(run, images, 32, 50, backend='rerank')
  assert rerank.rebuilt and not rerank.embedded and rerank.backend == 'rerank'
  assert any(r.startswith("backend: saved 'truncate'") for r in rerank.stale_reasons), rerank.stale_reasons
  assert isinstance(rerank.index, coarse_to_fine.CoarseToFineIndex)
  rerank_scores, _ = rerank.index.search(result.query_embedding[None], 3)
  np.testing.assert_allclose(rerank_scores[0], scores, atol=1e-5)
  auto = gallery_lib.gallery_index(run, images, 32, 50)  # 64 images: below the brute-force threshold.
  assert not auto.rebuilt and auto.backend == 'rerank'


def _fresh_copy(run_dir, tmp_path):
  """A copy of the run without saved indexes."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(run_dir, workdir)
  shutil.rmtree(os.path.join(workdir, gallery_lib.INDEX_DIR), ignore_errors=True)
  return workdir


def _hits(result):
  return [(h.index, h.score) for h in result.hits]


def test_damaged_saved_files_are_rebuilt_never_reused(run_dir, tmp_path, caplog):
  """A corrupt byte in the cached embeddings, or an empty ScaNN file: the query rebuilds from freshly
  embedded data, gives what the first (fresh) build gave, and does not report the index as reused."""
  caplog.set_level(logging.INFO)
  workdir = _fresh_copy(run_dir, tmp_path)
  first, = query.query(workdir, texts=[TEXT], k=5, out=io.StringIO())
  directory = first.index.directory
  embeddings_path = os.path.join(directory, index_store.EMBEDDINGS)
  with open(embeddings_path, 'r+b') as f:  # One byte of the last float.
    f.seek(-3, os.SEEK_END)
    byte = f.read(1)
    f.seek(-3, os.SEEK_END)
    f.write(bytes([byte[0] ^ 0x40]))
  caplog.clear()
  out = io.StringIO()
  second, = query.query(workdir, texts=[TEXT], k=5, out=out)
  assert second.index.rebuilt and second.index.embedded
  assert 'reused' not in out.getvalue(), out.getvalue()
  assert any(r.startswith(index_store.EMBEDDINGS) for r in second.index.stale_reasons), second.index.stale_reasons
  assert 'embeddings.npy' in caplog.text
  assert _hits(second) == _hits(first)

  scann_file = max((n for n in index_store.read_manifest(directory)['files'] if n.startswith('scann/')),
                   key=lambda n: os.path.getsize(os.path.join(directory, n)))
  open(os.path.join(directory, scann_file), 'wb').close()
  out = io.StringIO()
  third, = query.query(workdir, texts=[TEXT], k=5, out=out)
  assert third.index.rebuilt and not third.index.embedded  # The embeddings are intact: reused.
  assert third.index.stale_reasons == [f'{scann_file}: zero bytes']
  assert 'index reused' not in out.getvalue() and ': rebuilt (' in out.getvalue()
  assert _hits(third) == _hits(first)
  assert not query.query(workdir, texts=[TEXT], k=5, out=io.StringIO())[0].index.rebuilt  # Repaired.


def test_unreadable_images_in_the_folder_are_skipped_and_counted(run_dir, data_dir, tmp_path, caplog):
  caplog.set_level(logging.INFO)
  config = _config(data_dir)
  data = pipeline.load_split(config, 'test', pipeline.get_tokenizer(config))
  folder = tmp_path / 'photos'
  folder.mkdir()
  for i in range(6):
    Image.fromarray(data.images[i]).save(folder / f'scene{i}.png')
  (folder / 'broken.png').write_bytes(b'not an image at all')
  (folder / 'cut.png').write_bytes((folder / 'scene0.png').read_bytes()[:60])  # A truncated PNG.
  (folder / 'notes.txt').write_text('not an image name: not counted')
  out = io.StringIO()
  result, = query.query(run_dir, texts=[TEXT], k=10, image_dir=str(folder), out=out)
  gallery = result.gallery
  assert gallery.labels == [f'scene{i}.png' for i in range(6)] and gallery.size == 6
  assert gallery.skipped == ['broken.png', 'cut.png']
  assert len(result.hits) == 6 and {h.label for h in result.hits} == set(gallery.labels)
  assert 'top 6 of 6 images in' in out.getvalue() and '2 unreadable files skipped' in out.getvalue()
  assert 'broken.png' in caplog.text and 'cut.png' in caplog.text and 'notes.txt' not in caplog.text
  with pytest.raises(ValueError, match='None of the 2 images'):
    gallery_lib.folder_gallery(str(_only(folder, ['broken.png', 'cut.png'], tmp_path)), 32)


def _only(folder, names, tmp_path):
  """A folder holding just `names` of `folder`."""
  other = tmp_path / 'only'
  other.mkdir()
  for name in names:
    (other / name).write_bytes((folder / name).read_bytes())
  return other


def test_a_run_started_from_pretrained_towers_loads_without_them(run_dir, tmp_path):
  """Only the parameters are restored, from the checkpoint: the pretrained files a run started from are
  not read (they may be gone), and the optimizer / momentum state does not have to match the config."""
  workdir = _fresh_copy(run_dir, tmp_path)
  recorded = os.path.join(workdir, config_lib.CONFIG_FILE)
  with open(recorded) as f:
    flat = json.load(f)
  flat['model.image.init_checkpoint'] = str(tmp_path / 'gone' / 'vit.npz')
  with open(recorded, 'w') as f:
    json.dump(flat, f)
  run = gallery_lib.load_run(workdir)
  assert run.step == 150 and run.config.model.image.init_checkpoint.endswith('vit.npz')
  assert set(run.params) >= {'image_tower', 'text_tower'}
  # The momentum towers and queues of a queue_size > 0 config are not in this checkpoint: not needed.
  config = gallery_lib.config_from_workdir(workdir)
  config.contrastive.queue_size = 64
  result, = query.query(workdir, texts=[TEXT], k=3, config=config, out=io.StringIO())
  assert result.step == 150 and len(result.hits) == 3


def test_two_stage_recall_matches_exact_on_trained_embeddings(run_dir):
  """ScaNN over the 16-dim prefixes shortlisting 100 items (all 64 images for text-to-image, 100 of the
  320 captions the other way), re-ranked at 64 dims: the evaluator's two-stage mode gives the exact
  full-dim recall to 0.01 (measured: equal; the shortlists hold every exact top-10 caption)."""
  run = gallery_lib.load_run(run_dir)
  data = pipeline.load_split(run.config, 'test', run.tokenizer)
  image_emb, text_emb, text_image_ids = evaluate.embed_split(*run.embedders(), data, run.config.eval.batch_size)
  config = run.config
  config.eval.two_stage = ((16, 100),)
  config.eval.funnel = ()
  results = evaluate.evaluate(image_emb, text_emb, text_image_ids, evaluate.modes_from_config(config),
                              config.eval.ks)
  exact, two_stage = results['exact_dim64'], results['two_stage_dim16_k100']
  assert exact['t2i_r10'] > 40 and exact['i2t_r10'] > 40, exact  # Trained: chance is about 16 (percent).
  for key in ('i2t_r1', 'i2t_r5', 'i2t_r10', 't2i_r1', 't2i_r5', 't2i_r10'):
    assert abs(two_stage[key] - exact[key]) <= 1.0, (key, exact, two_stage)  # 1 point of percent.
  _, exact_top10 = retrieval.ExactIndex(text_emb).search(image_emb, 10)
  _, shortlists = coarse_to_fine.TwoStageSearch(16, 100).build(text_emb).candidates(image_emb)
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


@pytest.mark.parametrize('kwargs, message', [
    (dict(texts=[TEXT], coarse_dim=0), r'coarse_dim=0 is not in \[1, the embedding dim 64\]'),  # Not defaulted.
    (dict(texts=[TEXT], shortlist=0), 'shortlist=0 must be at least 1'),
    (dict(texts=[TEXT], image_dir='nowhere'), 'The image folder nowhere does not exist'),
    (dict(images=['README.md']), r'README.md is not a readable image \(UnidentifiedImageError'),
])
def test_bad_query_inputs_are_named(run_dir, kwargs, message):
  with pytest.raises(errors.InputError, match=message):
    query.query(run_dir, out=io.StringIO(), **kwargs)


def test_a_recall_target_tunes_the_saved_index_once_and_records_the_point(run_dir, tmp_path, caplog):
  """config.eval.scann.target_recall: the index is tuned on the other side's items (captions for the image
  gallery), the point goes into its manifest and is reused; another target tunes again."""
  workdir = _fresh_copy(run_dir, tmp_path)
  config = gallery_lib.config_from_workdir(workdir)
  config.eval.scann.target_recall = 0.9
  out = io.StringIO()
  with caplog.at_level(logging.INFO):
    first, = query.query(workdir, texts=[TEXT], k=3, config=config, out=out)
  point = first.index.operating_point
  assert point['reached'] and point['recall_at_10'] >= 0.9
  assert point['source'] == {'target_recall': 0.9, 'queries': 'test-captions', 'side': 'text', 'count': 320,
                             'min_shortlist': 3}
  assert index_store.read_manifest(first.index.directory)['operating_point'] == point
  assert first.index.index.shortlist == point['setting']['shortlist'] >= 10
  assert 'tuned to recall@10 0.9' in out.getvalue()
  assert caplog.text.count('Tuning ') == 1

  caplog.clear()
  with caplog.at_level(logging.INFO):
    second, = query.query(workdir, texts=[TEXT], k=3, config=config, out=io.StringIO())
  assert 'Tuning ' not in caplog.text and second.index.operating_point == point
  assert _hits(second) == _hits(first)

  config.eval.scann.target_recall = 1.0
  third, = query.query(workdir, texts=[TEXT], k=3, config=config, out=io.StringIO())
  assert third.index.operating_point['source']['target_recall'] == 1.0
  assert third.index.operating_point['recall_at_10'] == 1.0  # A brute-force coarse stage reaches it.

  config.eval.scann.target_recall = 1.5
  with pytest.raises(errors.InputError, match=r'config.eval.scann.target_recall=1.5 must be in \(0, 1\]'):
    query.query(workdir, texts=[TEXT], config=config, out=io.StringIO())


def test_a_garbage_config_record_an_unknown_split_and_a_large_k_are_named(run_dir, tmp_path, caplog):
  workdir = _fresh_copy(run_dir, tmp_path)
  with pytest.raises(errors.InputError, match=r"Unknown split 'val' of embedded_scenes; known: \['test', 'train'"):
    query.query(workdir, texts=[TEXT], split='val', out=io.StringIO())
  with caplog.at_level(logging.WARNING):
    result, = query.query(workdir, texts=[TEXT], k=1000, out=io.StringIO())
  assert len(result.hits) == 64 and 'k=1000 exceeds the 64 test images' in caplog.text
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write('{"seed" 0}')
  with pytest.raises(errors.InputError, match=r'config.json is not valid JSON \(Expecting'):
    query.query(workdir, texts=[TEXT], out=io.StringIO())


def test_a_checkpoint_of_another_model_is_named_before_any_array_is_read(run_dir):
  """A config whose model differs from the run's (no config.json to compare with): the shapes are compared
  from the checkpoint's metadata and the error names the arrays, for a resume and a params-only restore."""
  config = gallery_lib.config_from_workdir(run_dir)
  config.model.image.mlp_dim *= 2
  model = train_step.create_model(config, gallery_lib.load_run(run_dir).tokenizer.vocab_size)
  with pytest.raises(errors.InputError, match=r'checkpoints/150 was written by another model: \d+ arrays differ in '
                                              r'shape \(params\.image_tower\.encoder\.block0\.MlpBlock_0'):
    evaluators.restore_params(run_dir, config, model)
  abstract = jax.eval_shape(lambda: {'params': train_step.init_params(config, model, jax.random.key(0))})
  with pytest.raises(errors.InputError, match='was written by another model'):
    checkpointing.Checkpoints(run_dir, max_to_keep=1, create=False).restore_latest(abstract)


def test_a_run_of_another_config_file_is_rebuilt_from_its_record(run_dir, tmp_path):
  """Fields the default config lacks (a real-data config's) are taken as recorded: no --config needed."""
  workdir = _fresh_copy(run_dir, tmp_path)
  path = os.path.join(workdir, 'config.json')
  with open(path) as f:
    record = json.load(f)
  record.update({'data.source': 'karpathy', 'data.crop_scale': '(0.5, 1.0)', 'extra.depth': 3})
  with open(path, 'w') as f:
    json.dump(record, f)
  config = gallery_lib.config_from_workdir(workdir)
  assert config.data.source == 'karpathy' and config.data.crop_scale == (0.5, 1.0) and config.extra.depth == 3
  assert config.model.nested_dims == (8, 16, 32, 64)  # Known fields as before.
  result, = query.query(workdir, texts=[TEXT], k=2, out=io.StringIO())
  assert len(result.hits) == 2


def test_a_gallery_saved_in_shards_gives_the_hits_of_one_index(run_dir, tmp_path):
  """--num_shards=2: the 64 test images saved as two 32-image indexes (one manifest) answer as the single
  index does. Each shard's shortlist (50) covers it whole, so the merged hits are the exact top-k, as are the
  single index's for this query (50 of 64 by brute-force coarse cosine)."""
  workdir = _fresh_copy(run_dir, tmp_path)
  one, = query.query(workdir, texts=[TEXT], k=5, out=io.StringIO())
  out = io.StringIO()
  two, = query.query(workdir, texts=[TEXT], k=5, num_shards=2, out=out)
  assert two.index.directory == one.index.directory and 'in 2 shards' in out.getvalue()
  assert two.index.rebuilt and not two.index.embedded  # The single index's embeddings serve the shards.
  assert two.index.stale_reasons == ["kind: saved 'a single index', wanted 2 shards"], two.index.stale_reasons
  assert sorted(os.listdir(two.index.directory)) == ['manifest.json', 'shard_00000-of-00002',
                                                     'shard_00001-of-00002']
  assert [h.index for h in two.hits] == [h.index for h in one.hits]
  np.testing.assert_allclose([h.score for h in two.hits], [h.score for h in one.hits], atol=1e-6)
  again, = query.query(workdir, texts=[TEXT], k=5, num_shards=2, out=io.StringIO())
  assert not again.index.rebuilt and not again.index.embedded and _hits(again) == _hits(two)

  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  lines = {}
  for shards in (2, 1):
    completed = subprocess.run(
        [sys.executable, '-m', 'hivlp_jax.query', f'--workdir={workdir}', f'--text={TEXT}', '--k=5',
         f'--num_shards={shards}'], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines[shards] = [line.split() for line in completed.stdout.splitlines() if line.startswith('    ')]
  assert len(lines[1]) == 5
  assert [(l[0], l[3]) for l in lines[2]] == [(l[0], l[3]) for l in lines[1]]  # Rank and image, in order.
  with pytest.raises(errors.InputError, match='num_shards=0 must be at least 1'):
    query.query(workdir, texts=[TEXT], num_shards=0, out=io.StringIO())
