"""MSR-VTT: frame sampling, mp4 decoding (files written here with PyAV), the 1k-A split files, the stream."""

import csv
import json

import av
import jax
import numpy as np
import pytest

from configs import msrvtt as msrvtt_config
from hivlp_jax import errors
from hivlp_jax.data import eval_splits
from hivlp_jax.data import frames
from hivlp_jax.data import msrvtt
from hivlp_jax.data import pipeline
from hivlp_jax.data import sources
from hivlp_jax.data import streaming
from hivlp_jax.data import tokenizer as tokenizer_lib
from hivlp_jax.data import videos

# Well-separated solid colours: each frame of a written clip has its own, so a decoded frame names its index.
PALETTE = np.array([(r, g, b) for r in (30, 130, 230) for g in (30, 130, 230) for b in (30, 130, 230)], np.uint8)
SIZE, FRAMES = 16, 4


def write_mp4(path, colours, width=64, height=48, codec='mpeg4', **options):
  """An mp4 whose frame i is the solid colour colours[i] (or the picture, when it is one) (yuv420p, 8 fps).

  options: of av.open (e.g. format='matroska', options={'movflags': 'faststart'})."""
  with av.open(str(path), 'w', **options) as container:
    stream = container.add_stream(codec, rate=8)
    stream.width, stream.height, stream.pix_fmt = width, height, 'yuv420p'
    for colour in colours:
      image = np.broadcast_to(np.asarray(colour, np.uint8), (height, width, 3)).copy()
      for packet in stream.encode(av.VideoFrame.from_ndarray(image, format='rgb24')):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def frame_indices(clip, colours):
  """The index of the written colour nearest each decoded frame's mean colour, and that distance."""
  means = clip.reshape(clip.shape[0], -1, 3).astype(float).mean(1)
  distances = np.linalg.norm(means[:, None] - np.asarray(colours, float)[None], axis=-1)
  return distances.argmin(1), distances.min(1)


# -- Frame sampling.


def test_eval_indices_are_segment_centres_and_train_indices_lie_in_their_segments():
  np.testing.assert_array_equal(frames.sample_frame_indices(16, 4), [2, 6, 10, 14])
  rng = np.random.default_rng(0)
  draws = np.stack([frames.sample_frame_indices(30, 12, rng) for _ in range(200)])
  starts, ends = np.arange(12) * 30 / 12, np.arange(1, 13) * 30 / 12
  assert ((draws >= np.floor(starts)) & (draws < ends)).all()
  assert len({tuple(d) for d in draws}) > 100  # Random within the segments, not fixed.
  short = frames.sample_frame_indices(3, 8)
  assert len(short) == 8 and set(short.tolist()) == {0, 1, 2} and (np.diff(short) >= 0).all()


# -- Decoding.


@pytest.mark.parametrize('codec', ['mpeg4', 'libx264'])
def test_a_written_mp4_decodes_to_its_frames_at_the_segment_centres(tmp_path, codec):
  if codec not in av.codecs_available:
    pytest.skip(f'{codec} is not in this PyAV build')
  colours = PALETTE[:16]
  write_mp4(tmp_path / 'clip.mp4', colours, codec=codec)
  clip = videos.decode_clip(str(tmp_path / 'clip.mp4'), 48, 4)
  assert clip.shape == (4, 48, 48, 3) and clip.dtype == np.uint8
  indices, distances = frame_indices(clip, colours)
  np.testing.assert_array_equal(indices, [2, 6, 10, 14])
  assert distances.max() < 12  # yuv420p and the codec move a solid colour by a few levels.
  # The same bytes decode alike, and a short side of 48 px resized to 24 keeps the colours.
  from_bytes = videos.decode_clip((tmp_path / 'clip.mp4').read_bytes(), 24, 4)
  np.testing.assert_array_equal(frame_indices(from_bytes, colours)[0], [2, 6, 10, 14])


def test_training_clips_take_a_random_frame_of_each_segment_and_short_clips_repeat_frames(tmp_path):
  colours = PALETTE[:16]
  write_mp4(tmp_path / 'clip.mp4', colours)
  seen = set()
  for seed in range(6):
    clip = videos.decode_clip(str(tmp_path / 'clip.mp4'), SIZE, 4, np.random.default_rng(seed))
    indices, distances = frame_indices(clip, colours)
    assert clip.shape == (4, SIZE, SIZE, 3) and distances.max() < 12
    assert ((indices >= [0, 4, 8, 12]) & (indices < [4, 8, 12, 16])).all()
    seen.add(tuple(indices))
  assert len(seen) > 1
  write_mp4(tmp_path / 'short.mp4', PALETTE[:3])
  clip = videos.decode_clip(str(tmp_path / 'short.mp4'), SIZE, 8)
  np.testing.assert_array_equal(frame_indices(clip, PALETTE[:3])[0], frames.sample_frame_indices(3, 8))


def test_a_training_crop_is_one_box_for_the_whole_clip(tmp_path):
  """A static picture (left half dark, right half bright): every frame of a clip gets the same crop."""
  image = np.full((48, 64, 3), 20, np.uint8)
  image[:, 32:] = 235
  write_mp4(tmp_path / 'still.mp4', [image] * 8)
  brightness = set()
  for seed in range(6):
    clip = videos.decode_clip(str(tmp_path / 'still.mp4'), SIZE, 4, np.random.default_rng(seed)).astype(float)
    assert np.abs(clip - clip[:1]).max() < 12
    brightness.add(round(clip.mean() / 10))
  assert len(brightness) > 1  # The boxes differ between clips (else this would not test them).


def test_a_container_without_a_frame_count_is_sampled_from_its_packet_count(tmp_path):
  write_mp4(tmp_path / 'clip.mkv', PALETTE[:16], format='matroska')
  with av.open(str(tmp_path / 'clip.mkv')) as container:
    assert container.streams.video[0].frames == 0  # Matroska keeps no frame count.
  np.testing.assert_array_equal(frame_indices(videos.decode_clip(str(tmp_path / 'clip.mkv'), SIZE, 4), PALETTE[:16])[0],
                                [2, 6, 10, 14])


def test_a_truncated_file_whose_header_promises_more_frames_is_corrupt(tmp_path):
  """Moov first (faststart): the file opens and says 16 frames, but only the first few decode (then grey)."""
  write_mp4(tmp_path / 'clip.mp4', PALETTE[:16], options={'movflags': 'faststart'})
  data = (tmp_path / 'clip.mp4').read_bytes()
  (tmp_path / 'half.mp4').write_bytes(data[:len(data) // 2])
  assert videos.is_readable(str(tmp_path / 'half.mp4'))
  assert videos.read_clip(str(tmp_path / 'half.mp4'), SIZE, 4) == (None, 'corrupt_videos')


def test_corrupt_truncated_and_missing_files_are_reported_not_raised(tmp_path):
  write_mp4(tmp_path / 'good.mp4', PALETTE[:16])
  data = (tmp_path / 'good.mp4').read_bytes()
  (tmp_path / 'truncated.mp4').write_bytes(data[:len(data) // 2])
  (tmp_path / 'random.mp4').write_bytes(np.random.default_rng(0).bytes(4000))
  (tmp_path / 'empty.mp4').write_bytes(b'')
  for name in ('truncated', 'random', 'empty'):
    assert videos.read_clip(str(tmp_path / f'{name}.mp4'), SIZE, 4) == (None, 'corrupt_videos'), name
    assert not videos.is_readable(str(tmp_path / f'{name}.mp4'))
  assert videos.read_clip(str(tmp_path / 'absent.mp4'), SIZE, 4) == (None, 'missing_parts')
  assert videos.read_clip(str(tmp_path / 'good.mp4'), SIZE, 4)[1] == ''
  assert videos.is_readable(str(tmp_path / 'good.mp4'))


# -- The MSR-VTT layout.

TRAIN_IDS = ['video0', 'video1', 'video2', 'video3', 'video4', 'video5']  # video4: not on disk; video5: corrupt.
TEST_IDS = ['video8', 'video6', 'video7']  # The JSFusion CSV's order, not sorted.


def video_colours(index):
  """Video i's frames: 8 colours of the palette from 3i (video3: only 3 frames, shorter than a clip)."""
  return PALETTE[[(3 * index + k) % len(PALETTE) for k in range(3 if index == 3 else 8)]]


def write_layout(root):
  (root / 'videos' / 'all').mkdir(parents=True)
  for video_id in TRAIN_IDS[:4] + TEST_IDS:
    write_mp4(root / 'videos' / 'all' / f'{video_id}.mp4', video_colours(int(video_id[5:])))
  (root / 'videos' / 'all' / 'video5.mp4').write_bytes(np.random.default_rng(1).bytes(3000))
  sentences = [{'caption': f'video {i} caption {c}', 'video_id': f'video{i}', 'sen_id': 20 * i + c}
               for c in range(20) for i in range(9)]  # Interleaved, as the real file is not grouped by clip.
  videos_list = [{'video_id': f'video{i}', 'id': i, 'split': 'train', 'url': f'https://youtu.be/?v={i}'}
                 for i in range(9)]
  (root / 'MSRVTT_data.json').write_text(json.dumps({'sentences': sentences, 'videos': videos_list}))
  with open(root / 'MSRVTT_train.9k.csv', 'w', newline='') as f:
    csv.writer(f).writerows([['video_id']] + [[v] for v in TRAIN_IDS])
  with open(root / 'MSRVTT_JSFUSION_test.csv', 'w', newline='') as f:
    csv.writer(f).writerows([['key', 'vid_key', 'video_id', 'sentence']] +
                            [[f'ret{i}', f'msr{v[5:]}', v, f'a test sentence for video {v[5:]}']
                             for i, v in enumerate(TEST_IDS)])


@pytest.fixture(scope='module')
def layout(tmp_path_factory):
  root = tmp_path_factory.mktemp('msrvtt')
  write_layout(root)
  return root


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  texts = [f'video {i} caption {c}' for i in range(9) for c in range(20)] + [
      f'a test sentence for video {i}' for i in range(9)]
  return tokenizer_lib.train_tokenizer(texts, str(tmp_path_factory.mktemp('vocab') / 'vocab.txt'), vocab_size=120)


def _config(manual_dir):
  config = msrvtt_config.get_config()
  config.data.manual_dir = str(manual_dir)
  config.model.image_size, config.model.text.max_len, config.model.video.num_frames = SIZE, 8, FRAMES
  config.batch_size = 4
  config.data.num_workers, config.data.device_prefetch, config.data.prefetch = 2, 0, 1
  return config


def test_the_train_split_is_the_9k_csv_with_every_caption_and_the_test_split_the_jsfusion_pairs(layout):
  train = msrvtt.read_split(str(layout), 'train')
  assert [e['video_id'] for e in train] == TRAIN_IDS
  for entry in train:
    assert entry['captions'] == [f'video {entry["video_id"][5:]} caption {c}' for c in range(20)]
    assert entry['path'].endswith(f'videos/all/{entry["video_id"]}.mp4')
  test = msrvtt.read_split(str(layout), 'test')
  assert [(e['video_id'], e['captions']) for e in test] == [
      (v, [f'a test sentence for video {v[5:]}']) for v in TEST_IDS]
  source = sources.source_from_config(_config(layout), 'train')
  assert {e.kind for e in source.examples} == {'video'}
  with pytest.raises(errors.InputError, match="no 'validation' split"):
    msrvtt.read_split(str(layout), 'validation')


def test_missing_files_are_named_with_what_to_download_and_where(layout, tmp_path):
  with pytest.raises(errors.MissingInputError, match=r"'.*absent'.*config.data.manual_dir.*MSRVTT.zip"):
    msrvtt.read_split(str(tmp_path / 'absent'), 'train')
  (tmp_path / 'no_videos').mkdir()
  with pytest.raises(errors.MissingInputError, match=r"'videos/all/' is not there.*msrvtt_data.zip"):
    msrvtt.read_split(str(tmp_path / 'no_videos'), 'test')
  partial = tmp_path / 'partial'
  (partial / 'videos' / 'all').mkdir(parents=True)
  (partial / 'MSRVTT_train.9k.csv').write_text((layout / 'MSRVTT_train.9k.csv').read_text())
  for split in ('train', 'test'):
    with pytest.raises(errors.MissingInputError, match="'MSRVTT_data.json' is not there"):
      msrvtt.read_split(str(partial), split)
  (partial / 'MSRVTT_data.json').write_text('{"videos": []}')
  with pytest.raises(errors.MissingInputError, match="'MSRVTT_JSFUSION_test.csv' is not there"):
    msrvtt.read_split(str(partial), 'test')
  with pytest.raises(errors.InputError, match="has no 'sentences' list"):
    msrvtt.read_split(str(partial), 'train')
  (partial / 'MSRVTT_JSFUSION_test.csv').write_text('key,sentence\nret0,a clip\n')
  with pytest.raises(errors.InputError, match="has no column 'video_id'"):
    msrvtt.read_split(str(partial), 'test')


def test_a_streamed_batch_holds_clips_of_the_captioned_videos_and_counts_the_bad_ones(layout, tokenizer):
  config = _config(layout)
  devices = jax.local_device_count()
  with streaming.create_train_stream(config, tokenizer) as stream:
    batches = [jax.tree.map(np.asarray, next(stream)) for _ in range(2)]  # 2 epochs of the 4 good clips.
    stats, state = stream.stats, stream.get_state()
  for batch in batches:
    assert batch['image'].shape == (devices, 4 // devices, FRAMES, SIZE, SIZE, 3)
    assert batch['image'].dtype == np.uint8 and batch['text'].shape == (devices, 4 // devices, 8)
    clips, texts = batch['image'].reshape((4, FRAMES, SIZE, SIZE, 3)), batch['text'].reshape(4, 8)
    shown = []
    for clip, text in zip(clips, texts):
      index = int(tokenizer.decode(text).split()[1])  # 'video <i> caption <c>'
      _, distances = frame_indices(clip, video_colours(index))
      assert distances.max() < 12  # Every frame is one of that video's frames: clip and caption agree.
      shown.append(index)
    assert sorted(shown) == [0, 1, 2, 3]  # Each epoch: the 4 readable clips once; video4 and video5 skipped.
  assert stats.samples == 8 and stats.missing_parts >= 1 and stats.corrupt_videos >= 1
  assert state['stats']['corrupt_videos'] == stats.corrupt_videos and state['source'] == 'msrvtt'
  with streaming.create_train_stream(config, tokenizer, state=state) as resumed:  # Resumes from the position.
    assert jax.tree.map(np.asarray, next(resumed))['image'].shape == batches[0]['image'].shape


def test_the_test_split_loads_whole_as_centre_clips(layout, tokenizer):
  config = _config(layout)
  assert pipeline.check_split(config, 'test', tokenizer) == 3
  data = pipeline.load_split(config, 'test', tokenizer)
  assert data.images.shape == (3, FRAMES, SIZE, SIZE, 3) and data.tokens.shape == (3, 1, 8)
  assert data.captions == [[f'a test sentence for video {v[5:]}'] for v in TEST_IDS]
  for clip, video_id in zip(data.images, TEST_IDS):
    indices, distances = frame_indices(clip, video_colours(int(video_id[5:])))
    np.testing.assert_array_equal(indices, frames.sample_frame_indices(8, FRAMES))
    assert distances.max() < 12


def test_an_incomplete_test_split_is_refused_naming_the_clip(layout, tmp_path, tokenizer):
  broken = tmp_path / 'broken'
  write_layout(broken)
  (broken / 'videos' / 'all' / 'video6.mp4').write_bytes(b'not a video')
  with pytest.raises(errors.InputError, match=r'1 of the 3 msrvtt test images are not readable.*video6.mp4'):
    eval_splits.check_eval_split(_config(broken), 'test', tokenizer)
  (broken / 'videos' / 'all' / 'video7.mp4').unlink()
  with pytest.raises(errors.MissingInputError, match=r'1 of the 3 msrvtt test images are missing.*video7.mp4'):
    eval_splits.check_eval_split(_config(broken), 'test', tokenizer)
