r"""Input-pipeline benchmark: web JPEG shards -> device-ready 224 px training batches, examples/s.

  python benchmarks/input_pipeline.py --workers=1,2,4 --processes=1,2 --batches=10 \
      --out=benchmarks/results/input_pipeline.json [--baseline_checkout=DIR --rounds=2]

Writes --num_shards tar shards of --per_shard samples (JPEGs of --min_px to --max_px on each side, quality
90, of smooth random scenes with texture: about 60-120 KB at 450 px, like web photos) into a temporary
folder and converts them to ArrayRecord files (data/convert_shards.py), then runs `streaming.TrainStream`
over them with each setting (decode threads; grain worker processes): random resized crop + flip to
--image_size, tokenisation (a WordPiece vocabulary trained on the captions), batches of --batch in the pmap
layout, copied to the local devices (`device_prefetch`) and waited for. The first --warmup batches (worker
start-up, first reads) are not timed; each timed batch is one `next()` plus `block_until_ready`. Each setting
runs in its own process.

--baseline_checkout: another checkout of this repository (e.g. `git worktree add ../before <commit>`), whose
pipeline is timed in the same run, setting by setting and round by round, interleaved with this one's. A
checkout from before grain (no data/records.py) reads the tars with its own pipeline (its threads, or its
`worker_processes=True` processes).

--ops first times the per-image transforms on one thread: PIL (the pipeline's choice) against tf.image
(decode_and_crop_jpeg + antialiased resize), so the choice can be rechecked on another machine.
"""

import io
import os
import json
import platform
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The checkout whose pipeline is timed: this one, or --baseline_checkout in a child process.
sys.path.insert(0, os.environ.get('INPUT_PIPELINE_CHECKOUT', REPO))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import jax
import numpy as np
from PIL import Image

from hivlp_jax import files
from hivlp_jax.data import images
from hivlp_jax.data import sources
from hivlp_jax.data import streaming
from hivlp_jax.data import tokenizer as tokenizer_lib

FLAGS = flags.FLAGS
flags.DEFINE_integer('num_shards', 4, 'Shards written.')
flags.DEFINE_integer('per_shard', 256, 'Samples per shard.')
flags.DEFINE_integer('min_px', 400, 'Smallest side of the generated JPEGs.')
flags.DEFINE_integer('max_px', 500, 'Largest side of the generated JPEGs.')
flags.DEFINE_integer('image_size', 224, 'Training crop size.')
flags.DEFINE_integer('batch', 256, 'Global batch (one host).')
flags.DEFINE_integer('batches', 10, 'Timed batches per setting.')
flags.DEFINE_integer('warmup', 2, 'Untimed batches per setting.')
flags.DEFINE_list('workers', ['1', '2', '4'], 'Decode thread counts.')
flags.DEFINE_list('processes', [], 'Decode process counts (spawned; start-up is in the warm-up).')
flags.DEFINE_bool('ops', True, 'Time the per-image transforms of PIL and tf.image first.')
flags.DEFINE_string('out', 'benchmarks/results/input_pipeline.json', 'JSON results (empty: none).')
flags.DEFINE_string('shard_dir', '', 'Where to write the shards (default: a temporary folder, removed).')
flags.DEFINE_string('baseline_checkout', '', 'Another checkout whose pipeline is timed beside this one.')
flags.DEFINE_integer('rounds', 1, 'Rounds over every setting (and checkout), interleaved.')
flags.DEFINE_string('measure', '', 'Internal: time one setting ("threads:N" or "processes:N") and print JSON.')


def synthetic_photo(rng: np.random.Generator) -> bytes:
  """A JPEG of a smooth random scene with fine texture: sizes and decode cost like a web photo's."""
  width, height = rng.integers(FLAGS.min_px, FLAGS.max_px + 1, 2)
  coarse = rng.integers(0, 256, (height // 24 + 2, width // 24 + 2, 3), dtype=np.uint8)
  image = np.asarray(Image.fromarray(coarse).resize((int(width), int(height)), Image.Resampling.BICUBIC))
  texture = rng.normal(0, 12, image.shape)
  image = np.clip(image + texture, 0, 255).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='JPEG', quality=90)
  return buffer.getvalue()


WORDS = ('a', 'man', 'woman', 'dog', 'red', 'car', 'on', 'the', 'street', 'beach', 'with', 'two', 'children')


def write_shards(directory: str) -> tuple[list[str], list[str], int]:
  """Writes the shards; returns their paths, the captions and the total JPEG bytes."""
  rng = np.random.default_rng(0)
  paths, captions, total = [], [], 0
  for shard in range(FLAGS.num_shards):
    path = os.path.join(directory, f'{shard:05d}.tar')
    with tarfile.open(path, 'w') as tar:
      for j in range(FLAGS.per_shard):
        key = f'{shard * FLAGS.per_shard + j:09d}'
        caption = ' '.join(rng.choice(WORDS, rng.integers(5, 15)))
        for name, data in ((f'{key}.jpg', synthetic_photo(rng)), (f'{key}.txt', caption.encode())):
          info = tarfile.TarInfo(name)
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
          total += len(data) if name.endswith('.jpg') else 0
        captions.append(caption)
    paths.append(path)
  return paths, captions, total


def time_ops(data: bytes, repeats: int = 50) -> dict[str, float]:
  """ms per image on one thread: decode + random resized crop + resize, PIL and tf.image."""
  size, rng = FLAGS.image_size, np.random.default_rng(0)

  def per_image(fn):
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
      fn()
    return (time.perf_counter() - start) / repeats * 1e3

  with Image.open(io.BytesIO(data)) as header:
    width, height = header.size
  left, top, right, bottom = images.center_crop_box(height, width)
  decoded = np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))
  result = {
      'pil_decode_crop_resize_ms': per_image(lambda: images.decode_for_training(data, size, rng)),
      'pil_crop_resize_of_array_ms': per_image(lambda: images.random_resized_crop(decoded, size, rng)),
  }
  import tensorflow as tf  # Only here: about 4 s and 700 MiB.
  encoded = tf.constant(data)

  def tf_fused():
    crop = tf.io.decode_and_crop_jpeg(encoded, [top, left, bottom - top, right - left], channels=3)
    return tf.cast(tf.image.resize(crop, (size, size), antialias=True), tf.uint8).numpy()

  result['tf_decode_and_crop_resize_ms'] = per_image(tf_fused)
  result['tf_crop_resize_of_array_ms'] = per_image(lambda: tf.cast(tf.image.resize(
      decoded[top:bottom, left:right], (size, size), antialias=True), tf.uint8).numpy())
  return result


def time_stream(directory: str, num_workers: int, processes: int) -> dict:
  """One setting, in this process, over the shards in `directory` (their vocabulary beside them)."""
  tokenizer = tokenizer_lib.Tokenizer(os.path.join(directory, 'vocab.txt'))
  options = dict(global_batch=FLAGS.batch, image_size=FLAGS.image_size, max_len=64, seed=0, num_workers=num_workers,
                 prefetch=4, device_prefetch=2)
  if os.path.exists(os.path.join(os.environ.get('INPUT_PIPELINE_CHECKOUT', REPO), 'hivlp_jax/data/records.py')):
    source = sources.webdataset_source(os.path.join(directory, 'ar', '*.array_record'))
    options.update(worker_processes=processes)
  else:  # Before grain: tars through a shuffle buffer; a pool of `num_workers` processes, or of threads.
    source = sources.webdataset_source(os.path.join(directory, '*.tar'))
    options.update(shards_per_group=FLAGS.num_shards, shuffle_buffer=256, worker_processes=bool(processes),
                   num_workers=processes or num_workers)
  stream = streaming.TrainStream(source, tokenizer, **options)
  with stream:
    start = time.perf_counter()
    for _ in range(FLAGS.warmup):
      jax.block_until_ready(next(stream))
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(FLAGS.batches):
      start = time.perf_counter()
      jax.block_until_ready(next(stream))
      times.append(time.perf_counter() - start)
    stats = stream.stats.as_dict()
  total = sum(times)
  return {'examples_per_s': FLAGS.batches * FLAGS.batch / total, 'median_batch_s': float(np.median(times)),
          'warmup_s': warmup_s, 'stats': stats}


def measure(checkout: str, directory: str, setting: str) -> dict:
  """Times one setting in a child process that imports `checkout`'s hivlp_jax."""
  env = dict(os.environ, INPUT_PIPELINE_CHECKOUT=checkout)
  command = [sys.executable, os.path.abspath(__file__), f'--measure={setting}', f'--shard_dir={directory}',
             f'--batch={FLAGS.batch}', f'--batches={FLAGS.batches}', f'--warmup={FLAGS.warmup}',
             f'--image_size={FLAGS.image_size}', f'--num_shards={FLAGS.num_shards}']
  out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
  if out.returncode:
    raise RuntimeError(f'{setting} in {checkout} failed:\n{out.stderr[-3000:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict]) -> str:
  """Median over rounds of each (checkout, setting)."""
  lines = ['| pipeline | setting | examples/s (median of rounds) | rounds | median batch s | warm-up s |',
           '|---|---|---|---|---|---|']
  groups = {}
  for r in rows:
    groups.setdefault((r['pipeline'], r['setting']), []).append(r)
  for (pipeline, setting), group in groups.items():
    rates = [r['examples_per_s'] for r in group]
    lines.append(f'| {pipeline} | {setting} | {np.median(rates):.0f} ({min(rates):.0f}-{max(rates):.0f}) | '
                 f'{len(group)} | {np.median([r["median_batch_s"] for r in group]):.3f} | '
                 f'{np.median([r["warmup_s"] for r in group]):.1f} |')
  return '\n'.join(lines)


def main(argv):
  del argv
  if FLAGS.measure:
    kind, count = FLAGS.measure.split(':')
    threads = int(count) if kind == 'threads' else 1
    print(json.dumps(time_stream(FLAGS.shard_dir, threads, int(count) if kind == 'processes' else 0)))
    return
  with tempfile.TemporaryDirectory() as tmp:
    directory = FLAGS.shard_dir or tmp
    os.makedirs(directory, exist_ok=True)
    start = time.perf_counter()
    paths, captions, jpeg_bytes = write_shards(directory)
    num_images = len(captions)
    print(f'Wrote {len(paths)} shards of {FLAGS.per_shard} JPEGs ({FLAGS.min_px}-{FLAGS.max_px} px, '
          f'{jpeg_bytes / num_images / 1e3:.0f} KB mean) in {time.perf_counter() - start:.1f} s.', flush=True)
    tokenizer_lib.train_tokenizer(captions, os.path.join(directory, 'vocab.txt'), vocab_size=200)
    from hivlp_jax.data import convert_shards  # This checkout's tool (a baseline checkout may predate it).
    convert_shards.convert(os.path.join(directory, '*.tar'), os.path.join(directory, 'ar'))
    ops = {}
    if FLAGS.ops:
      with tarfile.open(paths[0]) as tar:
        ops = time_ops(tar.extractfile(tar.getmembers()[0]).read())
      print('Per image, one thread: ' + ', '.join(f'{k} {v:.2f}' for k, v in ops.items()), flush=True)
    settings = [f'threads:{n}' for n in FLAGS.workers] + [f'processes:{n}' for n in FLAGS.processes]
    checkouts = [('this checkout', REPO)] + ([('baseline', FLAGS.baseline_checkout)] if FLAGS.baseline_checkout else [])
    rows = []
    for round_index in range(FLAGS.rounds):
      for setting in settings:
        for pipeline, checkout in checkouts:
          rows.append(dict(pipeline=pipeline, setting=setting, round=round_index,
                           **measure(checkout, directory, setting)))
          print(f'  round {round_index}, {pipeline}, {setting}: {rows[-1]["examples_per_s"]:.0f} examples/s',
                flush=True)
  print(format_table(rows), flush=True)
  config = {'num_shards': FLAGS.num_shards, 'per_shard': FLAGS.per_shard, 'px': [FLAGS.min_px, FLAGS.max_px],
            'mean_jpeg_kb': jpeg_bytes / num_images / 1e3, 'image_size': FLAGS.image_size, 'batch': FLAGS.batch,
            'batches': FLAGS.batches, 'warmup': FLAGS.warmup, 'rounds': FLAGS.rounds,
            'baseline': bool(FLAGS.baseline_checkout), 'local_devices': jax.local_device_count(),
            'platform': jax.default_backend(), 'cpu_count': os.cpu_count(), 'machine': platform.machine(),
            'python': platform.python_version()}
  if FLAGS.out:
    files.write_json(FLAGS.out, {'config': config, 'ops_ms_per_image': ops, 'results': rows})


if __name__ == '__main__':
  app.run(main)
