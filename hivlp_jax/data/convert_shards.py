r"""Converts img2dataset webdataset tars to ArrayRecord files, which grain reads by index (data/records.py).

  python -m hivlp_jax.data.convert_shards --shards='data/web/{00000..00009}.tar' --out_dir=data/web_ar \
      [--examples_per_file=10000] [--name=web] [--overwrite]

The tars are read in name order (`webdataset.raw_samples`); each usable example becomes one record, in
order, `--examples_per_file` to a file: OUT_DIR/web-00000-of-00003.array_record, ... Unusable samples
(missing parts, empty captions, malformed .json members) are skipped, counted in a `webdataset.ReadStats`
and named in the log (the first 10, then only counted; `sources.SkipLog`); a truncated or corrupt tar keeps
its samples before the damage and counts once in 'corrupt_shards'. Corrupt images are not looked for: the
bytes are copied undecoded, and the training workers count those that do not decode.

OUT_DIR/conversion.json, written last, records the source pattern, each tar and its size, each file and its
record count, the counts by reason and the seconds taken. Files are written under temporary names
(`web-00000.array_record.tmp`) and renamed when every tar is read, so a killed conversion leaves no file
that looks complete and an earlier conversion intact (conversion.json is gone during the renames alone);
run it again (it starts over). A folder holding another source's conversion is refused unless
--overwrite. OUT_DIR must be local: array_record's writer opens local paths only.
"""

import re
import time
from typing import Iterator

from absl import app
from absl import flags
from absl import logging
from array_record.python import array_record_module

from hivlp_jax import errors
from hivlp_jax import files
from hivlp_jax import log_filter
from hivlp_jax.data import records
from hivlp_jax.data import sources
from hivlp_jax.data import webdataset

CONVERSION_FILE = 'conversion.json'
# group_size:1 makes each record its own chunk, so reading one example reads only it (TFDS writes the same;
# grain logs an error for other sizes). Uncompressed: JPEG/PNG/WebP bytes are compressed already.
WRITER_OPTIONS = 'group_size:1,uncompressed'
TMP_SUFFIX = '.array_record.tmp'


def output_name(name: str, index: int, count: int) -> str:
  """The final name of file `index` of `count`: 'web-00001-of-00003.array_record'."""
  return f'{name}-{index:05d}-of-{count:05d}.array_record'


class _RollingWriter:
  """Writes records to temporary files of at most `per_file` records each, in order."""

  def __init__(self, out_dir: files.Path, name: str, per_file: int):
    self.out_dir, self.name, self.per_file = out_dir, name, per_file
    self.written = []  # [(temporary path, records)], closed files first, then the open one.
    self._writer = None

  def write(self, record: bytes) -> None:
    if self._writer is None or self.written[-1][1] == self.per_file:
      self._close_current()
      path = self.out_dir / f'{self.name}-{len(self.written):05d}{TMP_SUFFIX}'
      self._writer = array_record_module.ArrayRecordWriter(str(path), WRITER_OPTIONS)
      self.written.append((path, 0))
    path, count = self.written[-1]
    try:
      self._writer.write(record)
    except RuntimeError as e:  # array_record's writer reports an unwritable file on the first write.
      raise errors.InputError(f'Could not write {str(path)!r}: {e}') from None
    self.written[-1] = (path, count + 1)

  def _close_current(self) -> None:
    if self._writer is not None:
      writer, self._writer = self._writer, None
      try:
        writer.close()  # Raises RuntimeError when the file cannot be finished (a full disk).
      except RuntimeError as e:
        raise errors.InputError(f'Could not finish writing {str(self.written[-1][0])!r}: {e}') from None

  def finish(self) -> list[tuple[files.Path, int]]:
    self._close_current()
    return self.written

  def discard(self) -> None:
    """Closes and deletes what was written (after a failure, so no partial file stays behind)."""
    try:
      self._close_current()
    except (RuntimeError, errors.InputError):
      pass
    for path, _ in self.written:
      path.unlink(missing_ok=True)


def _owned_files(out_dir: files.Path, name: str) -> list[files.Path]:
  """Files a conversion named `name` wrote into `out_dir`: outputs and leftover temporary files."""
  return sorted(out_dir.glob(f'{name}-?????-of-?????.array_record')) + sorted(out_dir.glob(f'{name}-*{TMP_SUFFIX}'))


def _previous_outputs(out_dir: files.Path, shards: str, overwrite: bool) -> list[files.Path]:
  """The files of an earlier conversion in `out_dir` (replaced by this one); refuses another source's."""
  manifest = out_dir / CONVERSION_FILE
  if not manifest.exists():
    return []
  previous = files.read_json(manifest)
  if previous.get('source') != shards and not overwrite:
    raise errors.InputError(
        f'--out_dir={str(out_dir)!r} holds a conversion of {previous.get("source")!r}, not of {shards!r}: pass '
        'another --out_dir, or --overwrite to replace it.')
  return [out_dir / f['path'] for f in previous.get('files', [])]


def _log_progress(done: int, tars: list[dict], examples: int, skipped: int, start: float) -> None:
  elapsed = time.time() - start
  done_bytes, total_bytes = sum(t['bytes'] for t in tars[:done]), sum(t['bytes'] for t in tars)
  eta = elapsed * (total_bytes - done_bytes) / done_bytes if done_bytes else float('nan')  # By bytes: tars vary.
  logging.info('Converted %d/%d tars: %d examples (%.0f/s), %d skipped; ETA %.0f s.', done, len(tars), examples,
               examples / max(elapsed, 1e-9), skipped, eta)


def _examples_of_tar(tar: str) -> Iterator[sources.RawExample]:
  for sample in webdataset.raw_samples(tar):
    yield sources.RawExample(sample.key, sample.image, (sample.caption,) if sample.caption else (),
                             sample.problem, origin=tar, detail=sample.detail)


def convert(shards: str, out_dir: str, examples_per_file: int = 10000, name: str = 'web',
            overwrite: bool = False) -> dict:
  """Converts the tars of `shards` (see `webdataset.expand_shards`) into `out_dir`; returns conversion.json's dict."""
  if '://' in str(out_dir):
    raise errors.InputError(f'--out_dir={out_dir!r}: ArrayRecord files are written to a local folder only. '
                            'Convert into a local folder, then copy it to the bucket.')
  if not re.fullmatch(r'[\w.-]+', name):
    raise errors.InputError(f'--name={name!r} must be a plain file name prefix (letters, digits, _ . -).')
  if examples_per_file < 1:
    raise errors.InputError(f'--examples_per_file={examples_per_file} must be at least 1.')
  try:
    tar_paths = webdataset.expand_shards(shards)
  except errors.MissingInputError:
    raise errors.MissingInputError(f"No tars match --shards={shards!r}: a glob ('data/web/*.tar'), a brace range "
                                   "('data/web/{00000..00009}.tar') or a comma list of img2dataset shards.") from None
  tars = [{'path': t, 'bytes': files.path(t).stat().length} for t in tar_paths]
  folder = files.make_dir(out_dir, '--out_dir')
  previous = _previous_outputs(folder, shards, overwrite)

  start, stats, skip_log = time.time(), webdataset.ReadStats(), sources.SkipLog(f'Converting {shards}')
  writer = _RollingWriter(folder, name, examples_per_file)
  try:
    for done, tar in enumerate(tar_paths, 1):
      for example in _examples_of_tar(tar):
        if example.problem:
          stats.count(example.problem)
          if skip_log.take(example.problem):
            skip_log.log(example.problem, example.describe())
          continue
        writer.write(records.encode(example))
        stats.samples += 1
      _log_progress(done, tars, stats.samples, sum(stats.as_dict().values()) - stats.samples, start)
    if not stats.samples:
      raise errors.InputError(f'No usable example in --shards={shards!r}: {webdataset.count_by_reason(stats)}.')
    written = writer.finish()
  except BaseException:  # Also on Ctrl-C: no temporary file stays behind.
    writer.discard()
    raise

  # The manifest goes first and comes back last: in between, the folder does not claim a complete conversion.
  (folder / CONVERSION_FILE).unlink(missing_ok=True)
  this_run = {str(path) for path, _ in written}
  for stale in previous + _owned_files(folder, name):  # Also a killed run's temporary files.
    if str(stale) not in this_run:
      stale.unlink(missing_ok=True)
  outputs = []
  for index, (path, count) in enumerate(written):
    final = folder / output_name(name, index, len(written))
    path.replace(final)
    outputs.append({'path': final.name, 'records': count})
  conversion = {'source': shards, 'tars': tars, 'files': outputs, 'stats': stats.as_dict(),
                'seconds': round(time.time() - start, 3), 'examples_per_file': examples_per_file,
                'writer_options': WRITER_OPTIONS, 'record': 'msgpack map: key, image, captions, kind (data/records.py)'}
  files.write_json(folder / CONVERSION_FILE, conversion)
  logging.info('Wrote %d ArrayRecord files to %s in %.1f s: %s.', len(outputs), folder, conversion['seconds'],
               webdataset.count_by_reason(stats))
  return conversion


def define_flags() -> None:
  """The command-line flags; defined only when run as a program."""
  flags.DEFINE_string('shards', None, "The webdataset tars: a glob, a brace range ('data/web/{00000..00009}.tar') "
                      'or a comma list.')
  flags.DEFINE_string('out_dir', None, 'The local folder of the ArrayRecord files and conversion.json.')
  flags.DEFINE_integer('examples_per_file', 10000, 'Records per ArrayRecord file (the last one holds the rest).')
  flags.DEFINE_string('name', 'web', 'The files\' name prefix: NAME-00000-of-00003.array_record.')
  flags.DEFINE_bool('overwrite', False, 'Replace a conversion of another source in --out_dir.')
  flags.mark_flags_as_required(['shards', 'out_dir'])


@errors.one_line_errors
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  log_filter.quiet_library_logs()
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  conversion = convert(FLAGS.shards, FLAGS.out_dir, FLAGS.examples_per_file, FLAGS.name, FLAGS.overwrite)
  print(f'Wrote {sum(f["records"] for f in conversion["files"])} examples in {len(conversion["files"])} files '
        f'to {FLAGS.out_dir}: {webdataset.count_by_reason(webdataset.ReadStats.from_dict(conversion["stats"]))}.')


if __name__ == '__main__':
  define_flags()
  app.run(main)
