"""MSR-VTT's 1k-A retrieval split as CLIP4Clip and Frozen in Time lay it out, in config.data.manual_dir:

  videos/all/<video_id>.mp4        the 10,000 clips (Frozen in Time's MSRVTT.zip; CLIP4Clip's MSRVTT_Videos/
                                   is read too when videos/all/ is absent)
  MSRVTT_data.json                 the annotation: 'sentences' [{'video_id', 'caption', ...}] (20 per clip)
  MSRVTT_train.9k.csv              training clips, column video_id (9,000)
  MSRVTT_JSFUSION_test.csv         test pairs, columns key, vid_key, video_id, sentence (1,000)

(the three annotation files are in CLIP4Clip's msrvtt_data.zip). Train: the 9,000 clips with all their
captions from the JSON. Test: the 1,000 JSFusion clips with the one caption each of the CSV, in its order.
Files are only listed here; clips are decoded by the streaming workers (data/videos.py), so a listed clip
missing on disk is skipped and counted in training, like a missing image.
"""

import csv
import io
import json

from hivlp_jax import errors
from hivlp_jax import files

VIDEO_DIRS = ('videos/all', 'MSRVTT_Videos')  # Frozen in Time's folder, then CLIP4Clip's.
ANNOTATION_FILE = 'MSRVTT_data.json'
SPLIT_FILES = {'train': 'MSRVTT_train.9k.csv', 'test': 'MSRVTT_JSFUSION_test.csv'}
VIDEOS_DOWNLOAD = 'https://www.robots.ox.ac.uk/~maxbain/frozen-in-time/data/MSRVTT.zip'
ANNOTATIONS_DOWNLOAD = 'https://github.com/ArrowLuo/CLIP4Clip/releases/download/v0.0/msrvtt_data.zip'


def missing_files_message(manual_dir: str, missing: str) -> str:
  return (f'MSR-VTT needs manual files in {manual_dir!r} (config.data.manual_dir), and {missing!r} is not there. '
          f'Put the clips in {VIDEO_DIRS[0]}/ (<video_id>.mp4, from Frozen in Time\'s MSRVTT.zip, '
          f'{VIDEOS_DOWNLOAD}; CLIP4Clip\'s {VIDEO_DIRS[1]}/ folder works too) and {ANNOTATION_FILE}, '
          f'{SPLIT_FILES["train"]} and {SPLIT_FILES["test"]} beside it (CLIP4Clip\'s msrvtt_data.zip, '
          f'{ANNOTATIONS_DOWNLOAD}). Download them, put them there, and run again.')


def videos_dir(manual_dir: str) -> str:
  """The clips' folder in `manual_dir`; MissingInputError (what to download, where) when there is none."""
  root = files.path(manual_dir)
  if not root.is_dir():
    raise errors.MissingInputError(missing_files_message(manual_dir, manual_dir))
  for name in VIDEO_DIRS:
    if (root / name).is_dir():
      return str(root / name)
  raise errors.MissingInputError(missing_files_message(manual_dir, f'{VIDEO_DIRS[0]}/'))


def _required(manual_dir: str, name: str):
  path = files.path(manual_dir) / name
  if not path.exists():
    raise errors.MissingInputError(missing_files_message(manual_dir, name))
  return path


def _csv_rows(path, columns: tuple[str, ...]) -> list[dict]:
  rows = list(csv.DictReader(io.StringIO(path.read_text())))
  header = list(rows[0]) if rows else []
  for column in columns:
    if column not in header:
      raise errors.InputError(f'{path} has no column {column!r} (columns: {header}); it should be CLIP4Clip\'s '
                              f'{path.name} ({ANNOTATIONS_DOWNLOAD}).')
  for index, row in enumerate(rows):
    for column in columns:
      if not (row[column] or '').strip():
        raise errors.InputError(f'{path}: row {index + 2} has an empty {column!r}.')
  return rows


def _captions_by_video(path) -> dict[str, list[str]]:
  """video_id -> its captions, in the order of the annotation's 'sentences'."""
  try:
    data = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise errors.InputError(f'{path} is not valid JSON ({e}); it should be MSR-VTT\'s {ANNOTATION_FILE}.') from e
  sentences = data.get('sentences') if isinstance(data, dict) else None
  if not isinstance(sentences, list):
    raise errors.InputError(f"{path} has no 'sentences' list: it is not MSR-VTT's {ANNOTATION_FILE} "
                            f'({ANNOTATIONS_DOWNLOAD}).')
  captions = {}
  for index, sentence in enumerate(sentences):
    if not (isinstance(sentence, dict) and isinstance(sentence.get('video_id'), str)
            and isinstance(sentence.get('caption'), str)):
      raise errors.InputError(f"{path}: sentences[{index}] has no 'video_id' and 'caption' strings.")
    text = sentence['caption'].strip()
    if text:
      captions.setdefault(sentence['video_id'], []).append(text)
  return captions


def read_split(manual_dir: str, split: str) -> list[dict]:
  """[{'video_id', 'path', 'captions': [str]}] of a split, in its CSV's order; checks the files first.

  train: every caption of each clip in the annotation (a clip with none keeps an empty list: training
  counts it as 'empty_captions'); test: the CSV's one sentence per clip.
  """
  if split not in SPLIT_FILES:
    raise errors.InputError(f'MSR-VTT has no {split!r} split; known: {sorted(SPLIT_FILES)} (the 1k-A split, '
                            'whose test split is also the validation split).')
  folder = files.path(videos_dir(manual_dir))
  annotation = _required(manual_dir, ANNOTATION_FILE)  # Checked for both splits: the set is complete or not.
  split_file = _required(manual_dir, SPLIT_FILES[split])
  if split == 'test':
    rows = _csv_rows(split_file, ('video_id', 'sentence'))
    pairs = [(row['video_id'].strip(), [row['sentence'].strip()]) for row in rows]
  else:
    rows = _csv_rows(split_file, ('video_id',))
    captions = _captions_by_video(annotation)
    pairs = [(row['video_id'].strip(), captions.get(row['video_id'].strip(), [])) for row in rows]
  return [{'video_id': video_id, 'path': str(folder / f'{video_id}.mp4'), 'captions': texts}
          for video_id, texts in pairs]
