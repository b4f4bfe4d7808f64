"""The embedded clips as training and evaluation data: frame sampling, batches, t2v/v2t metrics, the job."""

import json
import os

import numpy as np
import pytest

from configs import tiny
from configs import video_default
from hivlp_jax import config_lib
from hivlp_jax import errors
from hivlp_jax import evaluate
from hivlp_jax import retrieval
from hivlp_jax import train
from hivlp_jax.data import embedded_videos
from hivlp_jax.data import frames
from hivlp_jax.data import moving_scenes
from hivlp_jax.data import pipeline
from hivlp_jax.data import tokenizer as tokenizer_lib
from tests.conftest import tiny_config


@pytest.fixture(scope='module')
def video_dir(tmp_path_factory):
  """A data dir holding the 'tiny' embedded video data set (200 / 50 / 100 clips of 8 frames)."""
  path = str(tmp_path_factory.mktemp('videos'))
  embedded_videos.EmbeddedVideos(data_dir=path, config='tiny').download_and_prepare()
  return path


def _config(video_dir, num_frames=8):
  """configs/video_default.py on the tiny clips with a tiny model (configs/tiny.py's sizes)."""
  config, small = video_default.get_config(), tiny.get_config()
  config.data.update(dict(builder_config='tiny', data_dir=video_dir))
  video = config.model.video.to_dict()
  config.model, config.loss.dim_weights = small.model, small.loss.dim_weights
  config.model.video.update(dict(video, depth=1, num_frames=num_frames))
  config.batch_size = 16
  config.num_train_steps = 4
  config.optimizer.warmup_steps = 2
  config.log_every_steps = 2
  config.checkpoint_every_steps = 4
  config.eval.batch_size = 40
  config.eval.latency_queries = 5
  return config


def _tokenizer(config):
  return pipeline.get_tokenizer(config)


def test_frame_indices_of_train_and_eval():
  np.testing.assert_array_equal(frames.sample_frame_indices(8, 4), [1, 3, 5, 7])  # Segment centres.
  np.testing.assert_array_equal(frames.sample_frame_indices(16, 4), [2, 6, 10, 14])
  np.testing.assert_array_equal(frames.sample_frame_indices(8, 8), np.arange(8))
  np.testing.assert_array_equal(frames.sample_frame_indices(3, 8), [0, 0, 0, 1, 1, 2, 2, 2])  # Repeats, in order.
  rng = np.random.default_rng(0)
  draws = np.stack([frames.sample_frame_indices(20, 4, rng) for _ in range(500)])
  for i in range(4):  # Each training index lies in its segment [5i, 5i + 5) and every frame of it is drawn.
    assert set(draws[:, i]) == set(range(5 * i, 5 * i + 5))
  with pytest.raises(errors.InputError, match='0 frames'):
    frames.sample_frame_indices(0, 4)


def test_eval_split_holds_the_segment_centres_and_train_batches_draw_within_segments(video_dir):
  config = _config(video_dir, num_frames=4)
  tokenizer = _tokenizer(config)
  raw = embedded_videos.load_split(video_dir, 'test', 'tiny')['video']
  test = pipeline.load_split(config, 'test', tokenizer)
  assert test.images.shape == (100, 4, 32, 32, 3) and test.tokens.shape[:2] == (100, 5)
  np.testing.assert_array_equal(test.images, raw[:, [1, 3, 5, 7]])

  train_data = pipeline.load_split(config, 'train', tokenizer)
  assert train_data.images.shape == (200, 8, 32, 32, 3)  # Whole clips: training draws frames per step.
  batches = pipeline.train_batches(train_data, 16, seed=0, start_step=0, num_frames=4)
  first, second = next(batches), next(batches)
  assert first['image'].shape == (4, 4, 4, 32, 32, 3)  # [devices, per device, frames, H, W, 3].
  clips, ids = first['image'].reshape(16, 4, 32, 32, 3), first['image_id'].reshape(16)
  for clip, clip_id in zip(clips, ids):
    stored = train_data.images[clip_id]
    chosen = [[t for t in range(8) if np.array_equal(stored[t], frame)] for frame in clip]
    assert all(any(t // 2 == i for t in ts) for i, ts in enumerate(chosen))  # Frame i from segment i.
  resumed = next(pipeline.train_batches(train_data, 16, seed=0, start_step=1, num_frames=4))
  np.testing.assert_array_equal(resumed['image'], second['image'])  # A resumed run draws the same frames.


def test_clip_metrics_are_named_v2t_and_t2v_with_mean_rank():
  rng = np.random.default_rng(1)
  clips = rng.normal(size=(30, 8)).astype(np.float32)
  texts = np.repeat(clips, 2, axis=0) + rng.normal(scale=1.0, size=(60, 8)).astype(np.float32)
  ids = np.repeat(np.arange(30), 2)
  images = evaluate.retrieval_metrics(clips, texts, ids, retrieval.ExactSearch(8))
  videos = evaluate.retrieval_metrics(clips, texts, ids, retrieval.ExactSearch(8),
                                      directions=evaluate.VIDEO_DIRECTIONS)
  assert videos == {k.replace('i2t', 'v2t').replace('t2i', 't2v'): v for k, v in images.items()}
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # The evaluator scores cosine similarity.
  scores = unit(texts) @ unit(clips).T  # Dense reference: 1-based rank of each caption's clip, ties against it.
  ranks = np.sum(scores >= scores[np.arange(60), ids][:, None], axis=1)
  assert videos['t2v_mnr'] == pytest.approx(ranks.mean())
  assert videos['t2v_medr'] == pytest.approx(np.median(ranks))
  assert 1 < videos['t2v_mnr'] < 15  # Not a trivial case.
  assert 'v2t_r10' in evaluate.format_table({'exact_dim8': videos}, (1, 5, 10))


def test_video_job_trains_and_writes_t2v_metrics(video_dir, tmp_path):
  config = _config(video_dir)
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  full = results['exact_dim64']
  for key in ('t2v_r1', 't2v_r10', 'v2t_r10', 't2v_medr', 'v2t_mnr'):
    assert np.isfinite(full[key])
  assert 'i2t_r1' not in full
  with open(os.path.join(tmp_path, 'run', 'metrics.json')) as f:
    assert json.load(f)['exact_dim64']['t2v_r10'] == full['t2v_r10']


def test_an_unknown_builder_config_is_named(video_dir):
  config = _config(video_dir)
  config.data.builder_config = 'huge'
  with pytest.raises(errors.InputError, match="builder_config='huge' is not one of the embedded_videos configs"):
    config_lib.validate(config)


def test_tokenizer_trains_on_the_clip_captions(video_dir):
  tokenizer = _tokenizer(_config(video_dir))
  assert isinstance(tokenizer, tokenizer_lib.Tokenizer)
  ids = tokenizer.encode(['a small red circle slides to the left'], 32)[0]
  assert tokenizer.special_ids['[UNK]'] not in ids  # Words of the clips' captions are in the vocabulary.


def test_order_metrics_read_chance_for_an_order_blind_model_and_one_for_a_perfect_one():
  from benchmarks import video_order  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  reverse_of = np.array([-1, 0, -1, 2, -1])  # Clips 1 and 3 play clips 0 and 2 backwards; clip 4 alone.
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  perfect = unit(rng.normal(size=(5, 16)))
  texts = np.repeat(perfect, 3, axis=0)  # 3 captions per clip, each exactly its clip.
  ids = np.repeat(np.arange(5), 3)
  best = video_order.order_metrics(perfect, texts, ids, reverse_of)
  assert best == {'t2v_r1': 100.0, 'v2t_r1': 100.0, 't2v_order': 1.0, 'v2t_order': 1.0, 'pairs': 2}
  blind = perfect.copy()
  blind[[1, 3]] = blind[[0, 2]]  # A reversed clip embeds as its forward clip: 'mean' over frames.
  texts = unit(np.repeat(perfect, 3, axis=0) + 0.1 * rng.normal(size=(15, 16)))
  chance = video_order.order_metrics(blind, texts, ids, reverse_of)
  assert chance['t2v_order'] == 0.5 and chance['v2t_order'] == 0.5  # Every comparison a tie: half credit.
  assert chance['t2v_r1'] == 0.0  # Each caption ties its clip with the reverse: a tie counts against it.

  half_blind = perfect.copy()
  half_blind[1] = half_blind[0]  # Only the first pair embeds as one clip.
  kinds = np.array(['motion', 'motion', 'size', 'size', 'colour'])
  by_kind = video_order.order_metrics(half_blind, np.repeat(perfect, 3, axis=0), ids, reverse_of, kinds)
  assert by_kind['t2v_order_motion'] == 0.5 and by_kind['v2t_order_motion'] == 0.5
  assert by_kind['t2v_order_size'] == 1.0 and by_kind['v2t_order_size'] == 1.0
  assert by_kind['pairs_motion'] == by_kind['pairs_size'] == 1 and 'pairs_colour' not in by_kind  # Clip 4 alone.
  assert by_kind['t2v_order'] == 0.75


def test_reversal_kind_names_what_tells_a_clip_from_its_reverse():
  mover = moving_scenes.MovingObject('circle', 'red', 'small', 'left', 'slow', 'red', 'small', (0.5, 0.5), (0.5, 0.3))
  assert moving_scenes.reversal_kind([mover]) == 'motion'
  assert moving_scenes.reversal_kind([mover, mover._replace(end_size='large')]) == 'size'
  assert moving_scenes.reversal_kind([mover._replace(end_colour='blue')]) == 'colour'
  clips = moving_scenes.generate_clips('test', 200)
  kinds = {moving_scenes.reversal_kind(c.objects) for c in clips}
  assert kinds == set(moving_scenes.REVERSAL_KINDS)
  for clip in clips:  # A reversed clip differs from its forward one in the same way.
    if clip.reverse_of >= 0:
      assert moving_scenes.reversal_kind(clip.objects) == moving_scenes.reversal_kind(clips[clip.reverse_of].objects)


def test_grouped_train_order_keeps_each_clip_next_to_its_reverse():
  reverse_of = np.full(40, -1)
  reverse_of[1:40:3] = np.arange(0, 39, 3)  # Clips 1, 4, 7, ... play clips 0, 3, 6, ... backwards.
  groups = pipeline.reversal_groups(reverse_of)
  order = pipeline.TrainOrder(40, 5, global_batch=8, seed=0, groups=groups)
  for epoch in range(3):
    images = np.concatenate([order.indices(step)[0] for step in range(epoch * 5, epoch * 5 + 5)])
    assert sorted(images) == list(range(40))  # Every clip once an epoch.
    place = np.argsort(images)
    assert all(abs(place[b] - place[f]) == 1 for b, f in enumerate(reverse_of) if f >= 0)  # Side by side.
  epochs = [np.concatenate([order.indices(s)[0] for s in range(e * 5, e * 5 + 5)]) for e in range(2)]
  assert not np.array_equal(*epochs)  # Groups are reshuffled each epoch.
  again = pipeline.TrainOrder(40, 5, 8, seed=0, groups=groups)
  np.testing.assert_array_equal(again.indices(7)[0], order.indices(7)[0])  # A pure function of (seed, step).


def test_reversed_pairs_share_batches_and_the_option_is_refused_for_images(video_dir, data_dir):
  config = _config(video_dir)
  config.data.reversed_pairs_in_batch = True
  train_data = pipeline.load_split(config, 'train', _tokenizer(config))
  reverse_of = embedded_videos.load_split(video_dir, 'train', 'tiny')['reverse_of']
  np.testing.assert_array_equal(train_data.groups, pipeline.reversal_groups(reverse_of))
  batch = next(pipeline.train_batches(train_data, 32, seed=0, start_step=0))
  ids = set(batch['image_id'].reshape(-1).tolist())
  pairs = sum(f in ids for b, f in enumerate(reverse_of) if f >= 0 and b in ids)
  assert pairs >= 10  # About 2/3 of 32 clips are in pairs: most of them with their partner.
  scenes = tiny_config(data_dir)
  scenes.data.reversed_pairs_in_batch = True
  with pytest.raises(errors.InputError, match='reversed_pairs_in_batch'):
    pipeline.load_split(scenes, 'train', pipeline.get_tokenizer(scenes))
