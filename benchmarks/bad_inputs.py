r"""Every bad input named: tries each kind of bad input the way a new user meets it and records what they see.

  python benchmarks/bad_inputs.py [--out_dir=docs] [--only=config,query] [--only='w*,q01_*']

One case per bad input: a config field, a damaged data file, a workdir or checkpoint in a bad state, a
signal during training, a bad query. The script builds what the cases need once, in a temporary directory:
the tiny embedded data set and its vocabulary, a Flickr30K-layout manual dir, a COCO-layout one, web
shards, and a tiny run trained for 6 steps with checkpoints at 3 and 6 (copied for each workdir and query
case). It runs the real entry points, `python -m hivlp_jax.main` and `python -m hivlp_jax.query`, as
subprocesses (two at a time), and checks config fields in-process with `config_lib.validate`, the check the
command line runs first (a config case that validate accepts is then run as a subprocess too).

From each output it takes what the user sees: the error line (after any traceback) of a failed command;
else the first warning, logged error or skipped-example line that the good runs (the base run and a good
streamed run) do not print; else the command's own first output line. It judges whether that names the
input (it contains the field, flag or file name the case lists) and what was lost (checkpoints moved aside
or retrained steps, skipped examples, an evaluation not reached). It writes OUT_DIR/bad_inputs.json and
OUT_DIR/bad_inputs.md, with machine paths replaced by placeholders (WORKDIR, DATA_DIR, MANUAL_DIR, ...).

The subprocesses share a JAX compilation cache in the temporary directory (it saves the compile time of
repeated identical programs, nothing else). About 10 minutes on 2 CPU cores.
"""

import dataclasses
import fnmatch
import io
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from typing import Callable, Optional

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'  # Before jax is imported (in-process cases).
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `configs` and `hivlp_jax` of this checkout.
from configs import tiny  # pylint: disable=g-import-not-at-top,wrong-import-position
from hivlp_jax.data import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string('out_dir', 'docs', 'Where bad_inputs.json and bad_inputs.md are written.')
flags.DEFINE_list('only', [], 'Run only these cases: kinds (config, command line, data, workdir, checkpoint, '
                  'signals, query tool) or case ids, with * wildcards (e.g. w*,q01_*).')
flags.DEFINE_integer('workers', 2, 'Subprocesses at a time.')
flags.DEFINE_bool('keep_scratch', False, 'Keep the temporary directory (its path is printed).')
flags.DEFINE_bool('merge', False, 'With --only: replace (or add) the rows run now in OUT_DIR/bad_inputs.json and keep '
                  'the others, so a few new or changed cases do not need the whole 10-minute run.')

ABSL_LOG = re.compile(r'^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ [\w.<>-]+:\d+\] ?(.*)$')
ACCEPTED_INFO = re.compile(r'Resumed from the checkpoint|Training from step|Stopped after step|Results at step')
ERROR_WORDS = re.compile(r'(?i)error|unexpected|unknown|invalid|must|not one of|no such')
SKIP_LINE = re.compile(r'skipped an example \(|skipped the rest of a truncated')
TIMEOUT_S = 300
FLICKR_SPLITS = ['train'] * 36 + ['val'] * 2 + ['test'] * 8  # Image files 1000.jpg ... 1045.jpg.
FIRST_TEST = FLICKR_SPLITS.index('test')


# ----------------------------------------------------------------------------------------------------
# The scratch directory: what every case shares, and the placeholders that replace its paths in the page.


@dataclasses.dataclass
class Scratch:
  root: pathlib.Path

  def __post_init__(self):
    r = self.root
    self.data, self.cache, self.base = r / 'data', r / 'jax_cache', r / 'base_run'
    self.manual, self.coco, self.shards = r / 'manual' / 'flickr30k', r / 'manual' / 'coco', r / 'shards'
    self.streamed_config = r / 'tiny_streamed.py'
    config = tiny.get_config()
    config.data.data_dir = str(self.data)
    self.vocab = pathlib.Path(pipeline.vocab_file(config))  # The tiny run's trained vocabulary.

  def placeholders(self, case_dir: Optional[pathlib.Path] = None) -> list[tuple[str, str]]:
    pairs = [(self.streamed_config, 'TINY_STREAMED.py'), (self.data, 'DATA_DIR'), (self.base, 'BASE_RUN'),
             (self.manual, 'MANUAL_DIR'), (self.coco, 'COCO_DIR'), (self.shards, 'SHARDS'), (self.root, 'TMP')]
    if case_dir is not None:
      pairs = [(case_dir / 'run', 'WORKDIR'), (case_dir, 'CASE')] + pairs
    pairs = [(str(p), name) for p, name in pairs] + [(str(REPO) + '/', ''), (str(REPO), '.'),
                                                      (sys.executable, 'python'), (sys.prefix, 'VENV')]
    return sorted(pairs, key=lambda p: -len(p[0]))


def normalize(text: str, pairs: list[tuple[str, str]]) -> str:
  for path, name in pairs:
    text = text.replace(path, name)
  text = text.replace(repr(socket.gethostname()), "'HOST'").replace(f'"{socket.gethostname()}"', '"HOST"')
  return re.sub(r'/(?:tmp|work|home|root|usr)/[^\s\'",)]*', 'PATH', text)  # Anything left over.


def _jpeg(index: int) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from hivlp_jax.data import scenes  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(index)
  buffer = io.BytesIO()
  Image.fromarray(scenes.render(scenes.sample_scene(rng), 48, rng)).save(buffer, format='JPEG')
  return buffer.getvalue()


def _png(index: int) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  Image.open(io.BytesIO(_jpeg(index))).save(buffer, format='PNG')
  return buffer.getvalue()


def write_flickr(root: pathlib.Path) -> None:
  (root / 'flickr30k-images').mkdir(parents=True)
  entries = []
  for i, split in enumerate(FLICKR_SPLITS):
    (root / 'flickr30k-images' / f'{1000 + i}.jpg').write_bytes(_jpeg(i))
    entries.append({'filename': f'{1000 + i}.jpg', 'split': split, 'imgid': i,
                    'sentences': [{'raw': f'a small red circle number {i} caption {c}'} for c in range(5)]})
  (root / 'dataset_flickr30k.json').write_text(json.dumps({'images': entries, 'dataset': 'flickr30k'}))


def write_coco(root: pathlib.Path) -> None:
  """COCO's layout, but its split file's entries lack 'filepath' (the folder of each image)."""
  for folder in ('train2014', 'val2014'):
    (root / folder).mkdir(parents=True)
  entries = []
  for i, split in enumerate(FLICKR_SPLITS):
    (root / 'train2014' / f'{2000 + i}.jpg').write_bytes(_jpeg(i))
    entries.append({'filename': f'{2000 + i}.jpg', 'split': split,
                    'sentences': [{'raw': f'a blue square number {i} caption {c}'} for c in range(5)]})
  (root / 'dataset_coco.json').write_text(json.dumps({'images': entries, 'dataset': 'coco'}))


def write_tar(path: pathlib.Path, keys, images=None, captions=None, skip_caption=()) -> None:
  """A shard of `<key>.jpg` + `<key>.txt` samples; images/captions: {key: bytes/str} overrides."""
  with tarfile.open(path, 'w') as tar:
    for key in keys:
      members = [(f'{key}.jpg', (images or {}).get(key, _jpeg(int(key))))]
      if key not in skip_caption:
        caption = (captions or {}).get(key, f'a large green cross number {key}')
        members.append((f'{key}.txt' if isinstance(caption, str) else f'{key}.json',
                        caption.encode() if isinstance(caption, str) else caption))
      for name, data in members:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def good_shards(directory: pathlib.Path, skip: int = -1) -> None:
  directory.mkdir(parents=True, exist_ok=True)
  for shard in range(4):
    if shard != skip:
      write_tar(directory / f'{shard:05d}.tar', [f'{shard * 10 + j:05d}' for j in range(10)])


STREAMED_CONFIG = '''"""configs/tiny.py's model on a Flickr30K-layout manual dir (written by the bad-input script)."""

from configs import flickr30k
from configs import tiny


def get_config():
  config = flickr30k.add_streaming_data_fields(tiny.get_config())
  config.data.name = 'flickr30k'
  config.data.manual_dir = {manual!r}
  config.data.vocab_file = {vocab!r}  # The tiny embedded run's vocabulary.
  config.data.num_workers = 2
  config.data.prefetch = 2
  config.data.device_prefetch = 0
  return config
'''


def write_shared_files(s: Scratch) -> None:
  write_flickr(s.manual)
  write_coco(s.coco)
  good_shards(s.shards)
  s.streamed_config.write_text(STREAMED_CONFIG.format(manual=str(s.manual), vocab=str(s.vocab)))


# ----------------------------------------------------------------------------------------------------
# Running a command and reading what the user sees.


def subprocess_env(devices: int = 1) -> dict:
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', TF_CPP_MIN_LOG_LEVEL='2',
             CUDA_VISIBLE_DEVICES='', PYTHONUNBUFFERED='1', JAX_COMPILATION_CACHE_DIR=str(SCRATCH.cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  env.pop('PYTHONPATH', None)
  return env


RUNNING: set[subprocess.Popen] = set()  # Killed if the script stops early.


@dataclasses.dataclass
class Output:
  status: int
  text: str
  seconds: float


def run_command(argv: list[str], devices: int = 1, timeout: float = TIMEOUT_S,
                on_line: Optional[Callable[[str, subprocess.Popen], None]] = None) -> Output:
  """Runs argv from the repo root, stdout and stderr together (as a terminal shows them)."""
  start = time.perf_counter()
  process = subprocess.Popen(argv, cwd=REPO, env=subprocess_env(devices), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, errors='replace')
  RUNNING.add(process)
  lines = []
  timer = threading.Timer(timeout, process.kill)
  timer.start()
  try:
    for line in process.stdout:
      lines.append(line)
      if on_line is not None:
        on_line(line, process)
    process.wait()
  finally:
    timer.cancel()
    RUNNING.discard(process)
  status = process.returncode
  if status == -signal.SIGKILL and time.perf_counter() - start >= timeout:
    lines.append(f'[killed by the bad-input script after {timeout:.0f} s]\n')
  return Output(status, ''.join(lines), time.perf_counter() - start)


def main_argv(workdir: pathlib.Path, args: list[str], streamed: bool = False) -> list[str]:
  config = str(SCRATCH.streamed_config) if streamed else 'configs/tiny.py'
  return [sys.executable, '-m', 'hivlp_jax.main', f'--config={config}', f'--workdir={workdir}',
          f'--config.data.data_dir={SCRATCH.data}'] + args


def query_argv(workdir: pathlib.Path, args: list[str]) -> list[str]:
  return [sys.executable, '-m', 'hivlp_jax.query', f'--workdir={workdir}'] + args


def _log_message(line: str) -> Optional[tuple[str, str]]:
  match = ABSL_LOG.match(line)
  return (match.group(1), match.group(2)) if match else None


def _shape(message: str) -> str:
  """A log message with its numbers and placeholder paths blanked: to compare it with the good runs'."""
  return re.sub(r'\d+(\.\d+)?', '#', message)


NOISE: set[str] = set()  # Shapes of the warnings and logged errors of the good runs.


def add_noise(text: str) -> None:
  """Remembers the warnings, logged errors and plain lines of a good run: they say nothing about a case."""
  for line in text.splitlines():
    parsed = _log_message(line)
    if parsed and parsed[0] in 'WE':
      NOISE.add(_shape(parsed[1]))
    elif not parsed and line.strip() and not line.startswith(' '):
      NOISE.add(_shape(line.strip()))


@dataclasses.dataclass
class Seen:
  form: str  # 'error', 'logged error', 'warning', 'counted skip', 'info' (ran; its log lines) or 'accepted'.
  message: str  # Its first line.
  traceback_lines: int = 0
  rest: str = ''  # The lines of a multi-line error message after the first.


def what_the_user_sees(out: Output, expect_status: int = 0, pick: str = '') -> Seen:
  """pick: a regex; when given, only warnings and skips matching it are this case's (rows sharing one run)."""
  lines = out.text.splitlines()
  starts = [i for i, line in enumerate(lines) if line.startswith('Traceback (most recent call last):')]
  if out.status != expect_status:
    if starts:
      after = [i for i in range(starts[-1] + 1, len(lines)) if lines[i].strip() and not lines[i].startswith(' ')]
      if after:
        rest = [line.strip() for line in lines[after[0] + 1:] if line.strip() and not _log_message(line)]
        return Seen('error', lines[after[0]].strip(), traceback_lines=after[0] - starts[0], rest=' '.join(rest))
    plain = [line.strip() for line in lines if line.strip() and not _log_message(line)
             and not line.startswith(' ') and _shape(line.strip()) not in NOISE]
    logged = [m[1] for m in map(_log_message, lines) if m and m[0] in 'WEF']
    errors = [line for line in plain if ERROR_WORDS.search(line)]
    if errors or plain:
      return Seen('error', (errors or plain)[-1])
    return Seen('error', logged[-1] if logged else f'(no output; exit status {out.status})')
  for line in lines:
    parsed = _log_message(line)
    if not parsed or parsed[0] not in 'WE' or _shape(parsed[1]) in NOISE or not re.search(pick, parsed[1]):
      continue
    if SKIP_LINE.search(parsed[1]):
      return Seen('counted skip', parsed[1])
    return Seen('logged error' if parsed[0] == 'E' else 'warning', parsed[1])
  info = [m[1] for m in map(_log_message, lines) if m and m[0] == 'I' and ACCEPTED_INFO.search(m[1])]
  if info:
    return Seen('info', '; '.join(dict.fromkeys(i.rstrip(':.') for i in info)))
  printed = [line.strip() for line in lines if line.strip() and not _log_message(line)]
  return Seen('accepted', ' / '.join(printed[:2]))


# ----------------------------------------------------------------------------------------------------
# What a workdir holds, before and after a case (to say what was lost).


def steps_of(workdir: pathlib.Path) -> list[int]:
  """The steps of WORKDIR/checkpoints whose folder holds any file (an empty folder is no checkpoint)."""
  directory = workdir / 'checkpoints'
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and any(
      f.is_file() for f in p.rglob('*')))


def copy_base(case_dir: pathlib.Path) -> pathlib.Path:
  workdir = case_dir / 'run'
  shutil.copytree(SCRATCH.base, workdir, ignore=shutil.ignore_patterns('indexes', 'events.*', 'metrics.json'))
  return workdir


def biggest_file(step_dir: pathlib.Path) -> pathlib.Path:
  return max((p for p in step_dir.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)


def flip_byte(path: pathlib.Path) -> None:
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x01
  path.write_bytes(bytes(data))


def training_loss(workdir: pathlib.Path, before: list[int], out: Output, seen: Seen, pick: str = '') -> str:
  """What a main run on a workdir lost: checkpoints moved aside or gone, steps trained again, no evaluation."""
  lost = []
  after = steps_of(workdir)
  quarantine = workdir / 'checkpoints_quarantine'
  moved = {int(p.name.split('-')[0]) for p in quarantine.iterdir()} if quarantine.is_dir() else set()
  for step in sorted(set(before) | moved):
    if step in moved and step in before:
      again = ', then saved again after training again' if step in after else ''
      lost.append(f'the checkpoint of step {step} (moved to checkpoints_quarantine/{again})')
    elif step in before and step not in after:
      lost.append(f'the checkpoint of step {step} (deleted)')
  resumed = re.search(r'Training from step (\d+) to (\d+)', out.text)
  if resumed and before and int(resumed.group(1)) < max(before):
    lost.append(f'steps {int(resumed.group(1)) + 1}-{max(before)} trained again')
  if out.status not in (0, 75) and resumed and int(resumed.group(1)) < int(resumed.group(2)):
    where = f'checkpointed up to step {max(after)}' if after else 'no checkpoint'
    reached = re.findall(r'\] \[(\d+)\] ', out.text)
    if reached:
      lost.append(f'the run failed after training (to step {reached[-1]}, {where}), before or in its evaluation')
  if seen.form == 'counted skip':
    lost.append(skipped_examples(out.text, pick))
  elif seen.form == 'warning' and re.search(pick, out.text) and skipped_examples(out.text, pick):
    lost.append(skipped_examples(out.text, pick))
  return '; '.join(lost) if lost else 'nothing'


def skipped_examples(text: str, pick: str = '') -> str:
  """The examples a run skipped (matching `pick`), with the run's count of their reason."""
  described, reasons = [], []
  for line in text.splitlines():
    parsed = _log_message(line)
    if parsed and SKIP_LINE.search(parsed[1]) and re.search(pick, parsed[1]):
      what = re.sub(r'^.*?: skipped ', '', parsed[1]).rstrip('.')
      reasons += re.findall(r'\((\w+)\)', what)[:1] or ['corrupt_shards']
      if what not in described:
        described.append(what)
  if not described:
    return ''
  total = re.findall(r'Training data \(all processes\): (\d+) samples read; skipped (\{.*\})', text)
  counts = json.loads(total[-1][1].replace("'", '"')) if total else {}
  count = '; '.join(f'the run counted {counts[r]} {r} skips, against {total[-1][0]} samples used in 6 steps'
                    for r in dict.fromkeys(reasons) if r in counts)
  return '; '.join('skipped ' + d for d in described[:2]) + (f' ({count})' if count else '')


def fresh_loss(workdir: pathlib.Path, out: Output, seen: Seen, pick: str = '') -> str:
  if not workdir.exists():
    return 'nothing (the workdir was not created)'
  if not workdir.is_dir():
    return 'nothing (the file is unchanged)' if workdir.read_text() == 'a file, not a folder\n' else 'the file was changed'
  loss = training_loss(workdir, [], out, seen, pick)
  if loss != 'nothing':
    return loss
  names = sorted({'TensorBoard events' if p.name.startswith('events.out') else p.name for p in workdir.iterdir()})
  return f'nothing (the workdir holds {", ".join(names)})' if names else 'nothing (the workdir is empty)'


# ----------------------------------------------------------------------------------------------------
# Cases.


@dataclasses.dataclass
class Row:
  id: str
  kind: str
  bad_input: str
  how: str
  command: str = ''
  exit_status: Optional[int] = None
  form: str = ''
  traceback_lines: int = 0
  response: str = ''
  names: tuple[str, ...] = ()
  clear: str = ''
  lost: str = ''
  seconds: float = 0.0
  other_lines: list[str] = dataclasses.field(default_factory=list)  # Further warnings and logged errors.
  output_tail: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Case:
  id: str
  kind: str
  bad_input: str
  names: tuple[str, ...]  # A clear message contains one of these (field, flag or file names).
  run: Callable[['Case', pathlib.Path], Row]
  needs: tuple[str, ...] = ()  # Prerequisite tasks (PREREQUISITES).
  spec: dict = dataclasses.field(default_factory=dict)


def finish(case: Case, case_dir: pathlib.Path, how: str, out: Optional[Output], seen: Seen, lost: str,
           argv: Optional[list[str]] = None, seconds: float = 0.0) -> Row:
  pairs = SCRATCH.placeholders(case_dir)
  message, rest = normalize(seen.message, pairs), normalize(seen.rest, pairs)
  named = lambda text: any(n.lower() in text.lower() for n in case.names)  # noqa: E731
  clear = 'yes' if seen.form != 'accepted' and (named(message) or named(rest)) else 'no'
  message = re.sub(r'events\.out\.tfevents\.[\w.-]+', 'events.out.tfevents.*', message)
  if clear == 'yes' and not named(message):  # The name is on a later line of the message: show them.
      message += ' … ' + (rest if len(rest) < 250 else rest[:249] + '…')
  tail = [normalize(line, pairs)[:300] for line in (out.text.splitlines()[-12:] if out else [])]
  other = [normalize(m[1], pairs)[:300] for m in map(_log_message, out.text.splitlines() if out else [])
           if m and m[0] in 'WE' and _shape(m[1]) not in NOISE and re.search(case.spec.get('pick', ''), m[1])]
  command = ' '.join(normalize(a, pairs) for a in argv) if argv else ''
  return Row(id=case.id, kind=case.kind, bad_input=case.bad_input, how=how, command=command,
             exit_status=out.status if out else None, form=seen.form, traceback_lines=seen.traceback_lines,
             response=message, names=case.names, clear=clear, lost=normalize(lost, pairs),
             seconds=round(out.seconds if out else seconds, 2), other_lines=list(dict.fromkeys(other))[:6],
             output_tail=tail)


def format_value(value) -> str:
  if isinstance(value, (tuple, list)):
    return '(' + ','.join(format_value(v) for v in value) + (',)' if len(value) == 1 else ')')
  return str(value) if value != '' else "''"  # An empty string shows as one.


def apply_overrides(config, overrides: dict) -> None:
  for path, value in overrides.items():
    *parents, key = path.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[key] = value


def run_validate(case: Case, case_dir: pathlib.Path):
  """In-process config_lib.validate of configs/tiny.py (or TINY_STREAMED.py) with the case's overrides."""
  from hivlp_jax import config_lib  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  overrides = {k: (str(case_dir / v[5:]) if isinstance(v, str) and v.startswith('CASE/') else v)
               for k, v in case.spec['overrides'].items()}
  streamed = case.spec.get('streamed', False)
  start = time.perf_counter()
  try:
    config = config_lib.load_config_file(str(SCRATCH.streamed_config)) if streamed else tiny.get_config()
    config.data.data_dir = str(SCRATCH.data)
    if case.spec.get('assign'):  # What a config file's own assignment does.
      case.spec['assign'](config)
    apply_overrides(config, overrides)
    config_lib.validate(config)
  except Exception as e:  # pylint: disable=broad-except
    seen = Seen('error', f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}')
    return finish(case, case_dir, 'in-process config_lib.validate', None, seen,
                  'nothing (refused before the run touches its workdir)', seconds=time.perf_counter() - start)
  if case.spec.get('assign'):
    return finish(case, case_dir, 'in-process config_lib.validate', None, Seen('accepted', 'validate accepts it'),
                  'nothing', seconds=time.perf_counter() - start)
  # validate accepts it: what does the run do with it? (Once the base run has filled the compilation cache.)
  return Task(case.id, ('data', 'base'), lambda: run_accepted_config(case, case_dir, overrides, streamed))


def run_accepted_config(case: Case, case_dir: pathlib.Path, overrides: dict, streamed: bool) -> Row:
  workdir = case_dir / 'run'
  argv = main_argv(workdir, [f'--config.{k}={format_value(v)}' for k, v in overrides.items()], streamed)
  out = run_command(argv)
  seen = what_the_user_sees(out)
  return finish(case, case_dir, 'config_lib.validate accepts it; then main', out, seen,
                fresh_loss(workdir, out, seen), argv)


SHARED: dict[str, tuple[pathlib.Path, list[str], Output]] = {}  # Runs that several rows read: (workdir, argv, output).


def run_shared(case: Case, case_dir: pathlib.Path) -> Row:
  """A row of a run with several bad inputs, each its own example: it reads the lines that name its example."""
  workdir, argv, out = SHARED[case.spec['run']]
  seen = what_the_user_sees(out, pick=case.spec['pick'])
  row = finish(case, workdir.parent, 'subprocess, one run for several rows', out, seen,
               fresh_loss(workdir, out, seen, case.spec['pick']), argv)
  row.output_tail = [normalize(line, SCRATCH.placeholders(workdir.parent))[:300]
                     for line in out.text.splitlines() if re.search(case.spec['pick'], line)][:6]
  return row


def run_main(case: Case, case_dir: pathlib.Path) -> Row:
  spec = case.spec
  workdir = case_dir / 'run'
  if spec.get('from_base'):
    copy_base(case_dir)
  if spec.get('setup'):
    spec['setup'](case_dir)
  before = steps_of(workdir) if workdir.is_dir() else []
  args = [a.replace('CASE/', str(case_dir) + '/') for a in spec['args']]
  argv = main_argv(workdir, args, spec.get('streamed', False))
  if spec.get('argv_edit'):
    argv = spec['argv_edit'](argv)
  out = run_command(argv, devices=spec.get('devices', 1))
  if spec.get('then'):  # A second command (a resume): what it prints is the answer.
    first = out
    out = run_command(argv[:-1] if spec['then'] == 'resume' else argv)
    out.text = first.text + out.text
    out.seconds += first.seconds
  seen = what_the_user_sees(out)
  if spec.get('then') == 'resume':
    stopped = re.search(r'\] (Stopped after step .*)', out.text)
    resumed = re.search(r'\] (Resumed from the checkpoint of step \d+)', out.text)
    if stopped and resumed and seen.form == 'accepted':
      seen = Seen('accepted', f'{stopped.group(1)} / then: {resumed.group(1)}.')
  loss = training_loss(workdir, before, out, seen) if before else fresh_loss(workdir, out, seen)
  if spec.get('loss'):
    loss = spec['loss'](case_dir, out, loss)
  return finish(case, case_dir, 'subprocess', out, seen, loss, argv)


def run_query(case: Case, case_dir: pathlib.Path) -> Row:
  spec = case.spec
  workdir = case_dir / 'run'
  if spec.get('from_base', True):
    copy_base(case_dir)
  if spec.get('setup'):
    spec['setup'](case_dir)
  before = steps_of(workdir) if workdir.is_dir() else []
  argv = query_argv(workdir, [a.replace('CASE/', str(case_dir) + '/') for a in spec['args']])
  out = run_command(argv)
  seen = what_the_user_sees(out)
  after = steps_of(workdir) if workdir.is_dir() else []
  lost = 'nothing' if after == before else f'checkpoints {sorted(set(before) - set(after))} gone'
  return finish(case, case_dir, 'subprocess', out, seen, lost, argv)


def run_signal(case: Case, case_dir: pathlib.Path) -> Row:
  """Sends the signal once training has started (twice: Ctrl-C pressed twice), during step 1.

  The tiny config as the base run has it (its compiled step is in the cache): step 1 takes seconds (loading the
  compiled step), steps 2-6 milliseconds, so a signal sent once 'Training from step 0' is logged lands in step 1.
  """
  sig, twice = case.spec['signal'], case.spec.get('twice', False)
  workdir = case_dir / 'run'
  argv = main_argv(workdir, [])
  sent = []

  def on_line(line, process):
    if not sent and re.search(r'\] Training from step 0 to', line):
      sent.append(time.perf_counter())
      process.send_signal(sig)
      if twice:
        time.sleep(0.1)
        process.send_signal(sig)

  out = run_command(argv, on_line=on_line)
  seen = what_the_user_sees(out)
  if not sent:
    seen.message = 'the run never started training: ' + seen.message
  after = steps_of(workdir)
  stopped = re.search(r'after step (\d+) of', out.text)
  reached = re.findall(r'\] \[(\d+)\] ', out.text)
  last = int(stopped.group(1)) if stopped else (int(reached[-1]) if reached else 0)
  if after and max(after) >= last:
    lost = f'nothing (checkpointed step {max(after)}, the step it stopped after)'
  elif not after:
    lost = f'the step in progress{f" and steps 1-{last}" if last else ""}: no checkpoint was written'
  else:
    lost = f'steps {max(after) + 1}-{last}: the newest checkpoint is of step {max(after)}'
  return finish(case, case_dir, 'subprocess', out, seen, lost, argv)


# -- Setups for the cases (each gets its own CASE directory).


def edit_flickr_json(edit: Callable[[dict], None]) -> Callable[[pathlib.Path], None]:
  def setup(case_dir):
    manual = case_dir / 'manual'
    shutil.copytree(SCRATCH.manual, manual)
    path = manual / 'dataset_flickr30k.json'
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data) if isinstance(data, dict) else data)
  return setup


def flickr_with(change: Callable[[pathlib.Path], None]) -> Callable[[pathlib.Path], None]:
  def setup(case_dir):
    shutil.copytree(SCRATCH.manual, case_dir / 'manual')
    change(case_dir / 'manual')
  return setup


def damaged_checkpoint(steps=(6,), how='flip') -> Callable[[pathlib.Path], None]:
  def setup(case_dir):
    for step in steps:
      victim = biggest_file(case_dir / 'run' / 'checkpoints' / str(step))
      flip_byte(victim) if how == 'flip' else victim.unlink()
  return setup


def write_file(relative: str, content) -> Callable[[pathlib.Path], None]:
  def setup(case_dir):
    path = case_dir / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    data = content(case_dir) if callable(content) else content
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
  return setup


def remove(relative: str) -> Callable[[pathlib.Path], None]:
  def setup(case_dir):
    path = case_dir / relative
    shutil.rmtree(path) if path.is_dir() else path.unlink()
  return setup


def lock_of(pid_fn: Callable[[], int]) -> Callable[[pathlib.Path], str]:
  return lambda case_dir: json.dumps({'host': socket.gethostname(), 'pid': pid_fn(), 'started': '2026-01-01 00:00:00'})


def dead_pid() -> int:
  process = subprocess.Popen(['true'])
  process.wait()
  return process.pid


def image_dir(good: int, bad: int) -> Callable[[pathlib.Path], None]:
  def setup(case_dir):
    folder = case_dir / 'photos'
    folder.mkdir(parents=True)
    for i in range(good):
      (folder / f'photo{i}.png').write_bytes(_png(i))
    for i in range(bad):
      (folder / f'broken{i}.png').write_bytes(b'this is not a png, it is a text file\n')
  return setup


def lock_kept(case_dir, out, loss):
  path = case_dir / 'run' / 'run.lock'
  return loss if path.exists() and str(os.getpid()) in path.read_text() else loss + '; the live run\'s lock was removed'


def config_cases() -> list[Case]:
  v = lambda i, name, overrides, names, **spec: Case(  # noqa: E731
      f'c{i:02d}_{name}', 'config', ', '.join(f'`{k}={format_value(x)}`' for k, x in overrides.items()),
      names, run_validate, spec=dict(overrides=overrides, **spec))
  q = {'contrastive.queue_size': 64}
  mvm = {'mvlm.mvm_weight': 1.0}
  cases = [
      v(1, 'batch_size_0', {'batch_size': 0}, ('batch_size',)),
      v(2, 'log_every_0', {'log_every_steps': 0}, ('log_every_steps',)),
      v(3, 'checkpoint_every_0', {'checkpoint_every_steps': 0}, ('checkpoint_every_steps',)),
      v(4, 'keep_0', {'max_checkpoints_to_keep': 0}, ('max_checkpoints_to_keep',)),
      v(5, 'nonfinite_0', {'max_consecutive_nonfinite_steps': 0}, ('max_consecutive_nonfinite_steps',)),
      v(6, 'eval_batch_negative', {'eval.batch_size': -64}, ('eval.batch_size',)),
      v(7, 'steps_negative', {'num_train_steps': -1}, ('num_train_steps',)),
      v(8, 'lr_negative', {'optimizer.learning_rate': -1e-3}, ('learning_rate',)),
      v(9, 'lr_nan', {'optimizer.learning_rate': float('nan')}, ('learning_rate',)),
      v(10, 'lr_inf', {'optimizer.learning_rate': float('inf')}, ('learning_rate',)),
      v(11, 'b1_one', {'optimizer.b1': 1.0}, ('b1',)),
      v(12, 'b2_negative', {'optimizer.b2': -0.1}, ('b2',)),
      v(13, 'warmup_negative', {'optimizer.warmup_steps': -1}, ('warmup_steps',)),
      v(14, 'weight_decay_negative', {'optimizer.weight_decay': -0.05}, ('weight_decay',)),
      v(15, 'clip_negative', {'optimizer.grad_clip_norm': -1.0}, ('grad_clip_norm',)),
      v(16, 'end_lr_nan', {'optimizer.end_learning_rate_fraction': float('nan')}, ('end_learning_rate_fraction',)),
      v(17, 'nested_not_increasing', {'model.nested_dims': (16, 8, 32, 64)}, ('nested_dims',)),
      v(18, 'nested_beyond_head', {'model.nested_dims': (8, 16, 32, 128)}, ('nested_dims',)),
      v(19, 'nested_empty', {'model.nested_dims': ()}, ('nested_dims',)),
      v(20, 'dim_weights_count', {'loss.dim_weights': (1.0, 1.0, 1.0)}, ('dim_weights',)),
      v(21, 'dim_weights_negative', {'loss.dim_weights': (1.0, 1.0, 1.0, -1.0)}, ('dim_weights',)),
      v(22, 'data_name', {'data.name': 'flickr'}, ('data.name',)),
      v(23, 'patch_size', {'model.image.patch_size': 5}, ('patch_size',)),
      v(24, 'image_heads', {'model.image.num_heads': 3}, ('image.width', 'num_heads')),
      v(25, 'text_heads', {'model.text.num_heads': 5}, ('text.width', 'num_heads')),
      v(26, 'queue_not_multiple', {'contrastive.queue_size': 48}, ('queue_size',)),
      v(27, 'queue_negative', {'contrastive.queue_size': -32}, ('queue_size',)),
      v(28, 'kl_without_queue', {'contrastive.kl_weight': 0.5}, ('kl_weight',)),
      v(29, 'filter_without_queue', {'contrastive.filter_noisy_pairs': True}, ('filter_noisy_pairs',)),
      v(30, 'distill_without_queue', {'contrastive.distill_weight': 0.4}, ('distill_weight',)),
      v(31, 'kl_direction', {**q, 'contrastive.kl_direction': 'both'}, ('kl_direction',)),
      v(32, 'kl_stop_gradient', {**q, 'contrastive.kl_stop_gradient': 'all'}, ('kl_stop_gradient',)),
      v(33, 'momentum_schedule', {**q, 'contrastive.momentum_schedule': 'linear'}, ('momentum_schedule',)),
      v(34, 'momentum_above_1', {**q, 'contrastive.momentum': 1.5}, ('momentum',)),
      v(35, 'distill_above_1', {**q, 'contrastive.distill_weight': 1.5}, ('distill_weight',)),
      v(36, 'filter_stats_momentum', {**q, 'contrastive.filter_stats_momentum': 1.0}, ('filter_stats_momentum',)),
      v(37, 'filter_k_negative', {**q, 'contrastive.filter_k': -1.0}, ('filter_k',)),
      v(38, 'two_stage_beyond_head', {'eval.two_stage': ((128, 50),)}, ('two_stage',)),
      v(39, 'two_stage_shortlist_0', {'eval.two_stage': ((32, 0),)}, ('two_stage',)),
      v(40, 'two_stage_repeated', {'eval.two_stage': ((32, 50), (32, 50))}, ('two_stage',)),
      v(41, 'two_stage_not_pair', {'eval.two_stage': ((32,),)}, ('two_stage',)),
      v(42, 'funnel_beyond_head', {'eval.funnel': ((16, 200), (128, 50))}, ('funnel',)),
      v(43, 'funnel_dims_decrease', {'eval.funnel': ((64, 200), (16, 50))}, ('funnel',)),
      v(44, 'funnel_shortlist_grows', {'eval.funnel': ((16, 50), (64, 200))}, ('funnel',)),
      v(45, 'two_stage_backend', {'eval.two_stage_backend': 'fast'}, ('two_stage_backend',)),
      v(46, 'scann_leaves', {'eval.scann.num_leaves': -1}, ('scann.num_leaves',)),
      v(47, 'scann_threads', {'eval.scann.threads': -2}, ('scann.threads',)),
      v(48, 'ks_zero', {'eval.ks': (0, 5)}, ('eval.ks',)),
      v(49, 'ks_empty', {'eval.ks': ()}, ('eval.ks',)),
      v(50, 'temperature_above_max', {'model.temperature_init': 1.0}, ('temperature_init',)),
      v(51, 'temperature_min_0', {'model.temperature_min': 0.0}, ('temperature_min',)),
      v(52, 'text_mask_ratio', {'mvlm.mlm_weight': 1.0, 'mvlm.text_mask_ratio': 1.0}, ('text_mask_ratio',)),
      v(53, 'mlm_negative', {'mvlm.mlm_weight': -1.0}, ('mlm_weight',)),
      v(54, 'min_block_patches', {'mvlm.min_block_patches': 100}, ('min_block_patches',)),
      v(55, 'mvm_on_streamed', {**mvm}, ('mvm_weight',), streamed=True),
      v(56, 'codebook_1', {**mvm, 'visual_tokenizer.codebook_size': 1}, ('codebook_size',)),
      v(57, 'tokenizer_temperature', {**mvm, 'visual_tokenizer.temperature_end': 2.0}, ('temperature_end',)),
      v(58, 'tokenizer_eval_split', {**mvm, 'visual_tokenizer.eval_split': 'val'}, ('eval_split',)),
      v(59, 'tokenizer_batch_0', {**mvm, 'visual_tokenizer.batch_size': 0}, ('visual_tokenizer.batch_size',)),
      v(60, 'dvae_patch_6', {**mvm, 'model.image_size': 36, 'model.image.patch_size': 6}, ('patch_size',)),
      v(61, 'text_architecture', {'model.text.architecture': 'post_ln'}, ('architecture',)),
      v(62, 'bert_with_pre_ln', {'model.text.init_checkpoint': 'uncased_L-2_H-64/bert_model.ckpt'},
        ('architecture', 'init_checkpoint')),
      v(63, 'bert_missing', {'model.text.architecture': 'bert',
                             'model.text.init_checkpoint': 'CASE/uncased_L-2_H-64/bert_model.ckpt'},
        ('init_checkpoint', 'bert_model.ckpt')),
      v(64, 'vit_missing', {'model.image.init_checkpoint': 'CASE/ViT-Ti_16.npz'},
        ('image.init_checkpoint', 'ViT-Ti_16.npz')),
      v(65, 'noisy_fraction_1', {'data.noisy_caption_fraction': 1.0}, ('noisy_caption_fraction',)),
      v(66, 'eval_split', {'eval.split': 'val'}, ('eval.split', "'val'")),
      v(67, 'dtype', {'model.dtype': 'float8'}, ('model.dtype', 'float8')),
      v(68, 'max_len_0', {'model.text.max_len': 0}, ('max_len',)),
      v(69, 'builder_config', {'data.builder_config': 'huge'}, ('builder_config', 'BuilderConfig huge')),
      v(70, 'vocab_size', {'data.vocab_size': 50}, ('vocab_size',)),
      v(72, 'remat', {'model.remat': 'everything'}, ('model.remat',)),
      v(73, 'loss_kind', {'loss.kind': 'hinge'}, ('loss.kind',)),
      v(74, 'sigmoid_with_queue', {'loss.kind': 'sigmoid', 'contrastive.queue_size': 64},
        ('loss.kind', 'queue_size')),
      v(75, 'accumulation_not_dividing', {'accumulation_steps': 3}, ('accumulation_steps',)),
      v(76, 'accumulation_0', {'accumulation_steps': 0}, ('accumulation_steps',)),
      v(77, 'eval_dataset_unknown', {'eval.datasets': ('flickr',)}, ('eval.datasets', "'flickr'")),
      v(78, 'eval_dataset_empty', {'eval.datasets': ('embedded_scenes', '')}, ('eval.datasets[1]',)),
      v(79, 'video_temporal', {'model.video.temporal': 'lstm'}, ('video.temporal',)),
      v(80, 'video_frames_0', {'model.video.num_frames': 0}, ('video.num_frames',)),
  ]
  cases.append(Case('c71_string_in_float_field', 'config',
                    "a config file sets `config.optimizer.learning_rate = '1e-3'` (a string)", ('learning_rate',),
                    run_validate, spec=dict(overrides={}, assign=lambda c: setattr(c.optimizer, 'learning_rate',
                                                                                    '1e-3'))))
  return cases


def command_line_cases() -> list[Case]:
  def m(name, args, names, label='', **spec):
    return Case(name, 'command line', label or ' '.join(f'`{a}`' for a in args), names, run_main, ('data',),
                spec=dict(args=args, **spec))
  return [
      m('s01_batch_size_abc', ['--config.batch_size=abc'], ('batch_size',)),
      m('s02_misspelt_key', ['--config.model.nestd_dims=(8,16,32,64)'], ('nestd_dims',)),
      m('s03_lr_negative', ['--config.optimizer.learning_rate=-0.001'], ('learning_rate',)),
      m('s04_missing_config_file', [], ('tinny.py',), '`--config=configs/tinny.py` (no such file)',
        argv_edit=lambda a: [x.replace('configs/tiny.py', 'configs/tinny.py') for x in a]),
      m('s05_batch_not_divisible', ['--config.batch_size=33'], ('batch_size',),
        '`--config.batch_size=33` on 2 devices (`XLA_FLAGS=--xla_force_host_platform_device_count=2`)', devices=2),
      m('s06_no_workdir', [], ('workdir',), 'no `--workdir`', argv_edit=lambda a: [x for x in a if not x.startswith('--workdir')]),
      m('s07_extra_argument', ['train'], ("'train'",), 'an extra argument, `train`'),
      m('s08_misspelt_flag', ['--confg.batch_size=8'], ('confg',)),
  ]


def data_cases() -> list[Case]:
  def d(name, bad, names, args=(), setup=None, needs=('data',), **spec):
    return Case(name, 'data', bad, names, run_main, needs, spec=dict(args=list(args), setup=setup, streamed=True,
                                                                    **spec))

  def shared(name, run, bad, names, pick):
    return Case(name, 'data', bad, names, run_shared, (run,), spec=dict(run=run, pick=pick))

  manual = ['--config.data.manual_dir=CASE/manual']
  test_image = f'{1000 + FIRST_TEST}.jpg'

  flickr, web = 'flickr_damaged', 'web_damaged'
  return [
      d('d01_json_no_images', "dataset_flickr30k.json without an 'images' list", ('dataset_flickr30k.json',), manual,
        edit_flickr_json(lambda data: data.pop('images'))),
      d('d02_entry_no_sentences', "an entry of dataset_flickr30k.json without 'sentences'",
        ('sentences',), manual, edit_flickr_json(lambda data: data['images'][3].pop('sentences'))),
      shared('d04_empty_captions', flickr, 'every caption of training image 1005.jpg is empty',
             ('1005.jpg', 'images[5]'), r'1005\.jpg|images\[5\]'),
      shared('d05_train_image_missing', flickr, 'training image 1003.jpg deleted', ('1003.jpg',), r'1003\.jpg'),
      shared('d06_train_image_corrupt', flickr, 'training image 1004.jpg is not a JPEG (garbage bytes)',
             ('1004.jpg',), r'1004\.jpg'),
      d('d07_test_caption_blank', f'one of the 5 captions of test image {test_image} is blank', (test_image,),
        manual, edit_flickr_json(lambda data: data['images'][FIRST_TEST]['sentences'][1].update(raw=' '))),
      d('d08_test_image_missing', f'test image {test_image} deleted', (test_image,), manual,
        flickr_with(lambda m: (m / 'flickr30k-images' / test_image).unlink())),
      d('d09_test_image_corrupt', f'test image {test_image} is not a JPEG (garbage bytes)', (test_image,), manual,
        flickr_with(lambda m: (m / 'flickr30k-images' / test_image).write_bytes(b'\xff\xd8 not a jpeg')),
        needs=('data', 'base')),
      d('d10_manual_dir_missing', '`--config.data.manual_dir=CASE/nowhere` (does not exist)', ('nowhere',),
        ['--config.data.manual_dir=CASE/nowhere']),
      d('d12_unknown_source', '`--config.data.source=hf`', ('data.source',), ['--config.data.source=hf']),
      d('d13_coco_tfds_unprepared', '`--config.data.name=coco --config.data.source=tfds` with no TFDS build',
        ('coco_captions', 'data_dir'), ['--config.data.name=coco', '--config.data.source=tfds']),
      d('d14_coco_no_filepath', "COCO's dataset_coco.json entries without 'filepath'", ('filepath',),
        ['--config.data.name=coco', f'--config.data.manual_dir={SCRATCH.coco}']),
      d('d15_no_shards', '`--config.data.shards=CASE/shards_ar/*.array_record` matches no file', ('shards_ar',),
        WEB_ARGS, lambda case_dir: (case_dir / 'shards_ar').mkdir()),
      shared('d16_truncated_tar', web, 'web shard 00001.tar cut inside the image of sample 00015', ('00001.tar',),
             r'00001\.tar'),
      shared('d17_shard_not_tar', web, 'web shard 00003.tar is not a tar file (text)', ('00003.tar',), r'00003\.tar'),
      shared('d18_malformed_json', web, 'sample 00021 of shard 00002.tar has a malformed .json member',
             ('00021',), r'00021'),
      shared('d19_corrupt_shard_image', web, 'sample 00022 of shard 00002.tar has a corrupt JPEG', ('00022',),
             r'00022'),
      shared('d20_empty_shard_caption', web, 'sample 00023 of shard 00002.tar has an empty caption', ('00023',),
             r'00023'),
      shared('d21_sample_no_caption', web, 'sample 00024 of shard 00002.tar has an image but no caption member',
             ('00024',), r'00024'),
      d('d22_web_no_eval_name', 'web shards with no `config.data.eval_name`', ('eval_name',),
        ['--config.data.name=webdataset', '--config.data.shards=CASE/shards_ar/*.array_record'],
        converted_good_shards),
      d('d23_vocab_missing', '`--config.data.vocab_file=CASE/vocab.txt` (does not exist)', ('vocab.txt', 'vocab_file'),
        ['--config.data.vocab_file=CASE/vocab.txt']),
      d('d24_unconverted_tars', '`--config.data.shards=CASE/shards/*.tar`: tars, not converted to ArrayRecord',
        ('convert_shards', '.tar'), ['--config.data.name=webdataset', '--config.data.shards=CASE/shards/*.tar',
                                     '--config.data.eval_name=flickr30k'],
        lambda case_dir: good_shards(case_dir / 'shards')),
      d('d25_msrvtt_missing', '`--config.data.name=msrvtt` with no MSR-VTT files at `config.data.manual_dir`',
        ('manual_dir', 'MSRVTT'), ['--config.data.name=msrvtt', '--config.data.manual_dir=CASE/nowhere',
                                   '--config.data.captions_per_image=1']),
  ]


WEB_ARGS = ['--config.data.name=webdataset', '--config.data.shards=CASE/shards_ar/*.array_record',
            '--config.data.eval_name=flickr30k']


def damaged_flickr(case_dir: pathlib.Path) -> None:
  """Training images: 1003.jpg missing, 1004.jpg garbage, 1005.jpg's captions all empty."""
  manual = case_dir / 'manual'
  shutil.copytree(SCRATCH.manual, manual)
  (manual / 'flickr30k-images' / '1003.jpg').unlink()
  (manual / 'flickr30k-images' / '1004.jpg').write_bytes(b'\xff\xd8 not a jpeg')
  path = manual / 'dataset_flickr30k.json'
  data = json.loads(path.read_text())
  for sentence in data['images'][5]['sentences']:
    sentence['raw'] = ''
  path.write_text(json.dumps(data))


def converted_good_shards(case_dir: pathlib.Path) -> None:
  good_shards(case_dir / 'shards')
  subprocess.run([sys.executable, '-m', 'hivlp_jax.data.convert_shards', f'--shards={case_dir}/shards/*.tar',
                  f'--out_dir={case_dir}/shards_ar'], cwd=REPO, check=True, capture_output=True)


def damaged_shards(case_dir: pathlib.Path) -> None:
  """00000.tar whole; 00001.tar cut in sample 00015's image; 00002.tar with a malformed .json (00021), a corrupt
  JPEG (00022), an empty caption (00023) and no caption (00024); 00003.tar not a tar."""
  shards = case_dir / 'shards'
  good_shards(shards, skip=3)
  path = shards / '00001.tar'
  with tarfile.open(path) as tar:
    member = tar.getmember('00015.jpg')
  path.write_bytes(path.read_bytes()[:member.offset_data + member.size // 2])
  write_tar(shards / '00002.tar', [f'{20 + j:05d}' for j in range(10)], images={'00022': b'\xff\xd8 not a jpeg'},
            captions={'00021': b'{"caption": "a red', '00023': ''}, skip_caption=('00024',))
  (shards / '00003.tar').write_text('not a tar file\n' * 100)


def shared_run(name: str, setup: Callable[[pathlib.Path], None], args: list[str],
               convert: bool = False) -> Callable[[], None]:
  """One training run that several rows read; with `convert`, CASE/shards/*.tar are first converted to
  CASE/shards_ar by the conversion tool, whose output the rows read too (it names what it skips)."""
  def run():
    case_dir = SCRATCH.root / 'shared' / name
    case_dir.mkdir(parents=True)
    setup(case_dir)
    converted = Output(0, '', 0.0)
    if convert:
      converted = run_command([sys.executable, '-m', 'hivlp_jax.data.convert_shards',
                               f'--shards={case_dir}/shards/*.tar', f'--out_dir={case_dir}/shards_ar'])
    argv = main_argv(case_dir / 'run', [a.replace('CASE/', str(case_dir) + '/') for a in args], streamed=True)
    trained = run_command(argv)
    SHARED[name] = (case_dir / 'run', argv, Output(trained.status, converted.text + trained.text,
                                                   converted.seconds + trained.seconds))
  return run


def workdir_cases() -> list[Case]:
  def w(name, kind, bad, names, args=(), setup=None, from_base=True, **spec):
    return Case(name, kind, bad, names, run_main, ('data', 'base'),
                spec=dict(args=list(args), setup=setup, from_base=from_base, **spec))
  return [
      w('w01_other_config', 'workdir', 'a trained WORKDIR run again with `--config.seed=1`', ('seed',),
        ['--config.seed=1']),
      w('w02_locked', 'workdir', "WORKDIR/run.lock names a live process (this script's pid) on this host",
        ('run.lock',), setup=write_file('run/run.lock', lock_of(os.getpid)), loss=lock_kept),
      w('w03_stale_lock', 'workdir', 'WORKDIR/run.lock names a process that has exited', ('run.lock',),
        setup=write_file('run/run.lock', lock_of(dead_pid))),
      w('w04_garbage_lock', 'workdir', 'WORKDIR/run.lock holds garbage (not JSON)', ('run.lock',),
        setup=write_file('run/run.lock', 'pid=1234\n')),
      w('w05_empty_step_folder', 'checkpoint', 'an empty newest step folder WORKDIR/checkpoints/9/', ('checkpoints/9', '9'),
        setup=lambda case_dir: (case_dir / 'run' / 'checkpoints' / '9').mkdir()),
      w('w06_byte_flip', 'checkpoint', 'one byte flipped in the biggest file of checkpoint 6', ('differs from its checksum',),
        setup=damaged_checkpoint()),
      w('w07_deleted_file', 'checkpoint', 'the biggest file of checkpoint 6 deleted', ('is missing',),
        setup=damaged_checkpoint(how='delete')),
      w('w08_both_flipped', 'checkpoint', 'one byte flipped in checkpoint 3 and in checkpoint 6', ('checkpoint',),
        setup=damaged_checkpoint((3, 6))),
      w('w09_garbage_config_json', 'workdir', 'WORKDIR/config.json holds garbage (not JSON)', ('config.json',),
        setup=write_file('run/config.json', '{"batch_size": 32, "seed"')),
      w('w10_config_json_deleted', 'workdir', 'WORKDIR/config.json deleted (the checkpoints kept)', ('config.json',),
        setup=remove('run/config.json')),
      w('w11_other_model_no_record', 'workdir',
        'config.json deleted, then run with another model: `--config.model.image.mlp_dim=256`',
        ('mlp_dim', 'shape'),
        ['--config.model.image.mlp_dim=256'], remove('run/config.json')),
      w('w12_checksum_record_deleted', 'checkpoint', 'WORKDIR/checkpoint_checksums/6.json deleted', ('checksum',),
        setup=remove('run/checkpoint_checksums/6.json')),
      w('w13_checksum_record_garbage', 'checkpoint', 'WORKDIR/checkpoint_checksums/6.json holds garbage',
        ('6.json', 'checkpoint_checksums'), setup=write_file('run/checkpoint_checksums/6.json', 'garbage')),
      w('w14_workdir_is_file', 'workdir', '`--workdir` names an existing file', ('WORKDIR',), from_base=False,
        setup=write_file('run', 'a file, not a folder\n')),
      w('w15_stop_then_resume', 'workdir', '`--stop_after_step=3`, then the same command without it',
        ('stop_after_step', 'step 3'), ['--stop_after_step=3'], from_base=False, then='resume'),
      w('w16_stop_after_negative', 'workdir', '`--stop_after_step=-1`', ('stop_after_step',),
        ['--stop_after_step=-1'], from_base=False),
      w('w17_evaluate_missing_step', 'workdir', '`--mode=evaluate --step=5` (the run saved steps 3 and 6)',
        ('--step=5',), ['--mode=evaluate', '--step=5']),
      w('w18_evaluate_untrained', 'workdir', '`--mode=evaluate` on a workdir without checkpoints/',
        ('checkpoint',), ['--mode=evaluate'], remove('run/checkpoints')),
      w('w19_evaluate_set_not_on_disk', 'workdir', '`--mode=evaluate` with `config.eval.datasets=(flickr30k,)` and no '
        'files at `config.eval.locations.flickr30k.manual_dir`', ('eval.locations.flickr30k', 'dataset_flickr30k.json'),
        ['--mode=evaluate', "--config.eval.datasets=('flickr30k',)",
         '--config.eval.locations.flickr30k.manual_dir=CASE/nowhere']),
  ]


def signal_cases() -> list[Case]:
  return [
      Case('g01_sigterm', 'signals', 'SIGTERM while step 1 trains', ('SIGTERM',), run_signal, ('data', 'base'),
           spec=dict(signal=signal.SIGTERM)),
      Case('g02_sigint', 'signals', 'SIGINT (Ctrl-C) while step 1 trains', ('SIGINT',), run_signal, ('data', 'base'),
           spec=dict(signal=signal.SIGINT)),
      Case('g03_sigint_twice', 'signals', 'SIGINT twice, 0.1 s apart (Ctrl-C pressed twice) while step 1 trains',
           ('SIGINT',), run_signal, ('data', 'base'), spec=dict(signal=signal.SIGINT, twice=True)),
  ]


def query_cases() -> list[Case]:
  def q(name, bad, names, args, setup=None, from_base=True):
    return Case(name, 'query tool', bad, names, run_query, ('data', 'base', 'query_ok'),
                spec=dict(args=args, setup=setup, from_base=from_base))
  text = ['--text=a small red circle']
  return [
      q('q01_no_checkpoints', 'a workdir with config.json but no checkpoints/', ('checkpoint',), text,
        remove('run/checkpoints')),
      q('q02_image_dir_missing', '`--image_dir=CASE/photos` (does not exist)', ('photos',),
        text + ['--image_dir=CASE/photos']),
      q('q03_image_dir_corrupt', '`--image_dir` with 3 PNGs and one text file named broken0.png', ('broken0.png',),
        text + ['--image_dir=CASE/photos'], image_dir(3, 1)),
      q('q04_empty_text', "`--text=''` (an empty query)", ('text', 'empty'), ['--text=']),
      q('q05_k_zero', '`--k=0`', ('k=0', '--k'), text + ['--k=0']),
      q('q06_no_workdir', '`--workdir=WORKDIR` that does not exist', ('WORKDIR', 'workdir'), text, from_base=False),
      q('q07_image_missing', '`--image=CASE/query.png` (does not exist)', ('query.png',), ['--image=CASE/query.png']),
      q('q08_image_not_image', '`--image=CASE/query.png`, a text file', ('query.png',), ['--image=CASE/query.png'],
        write_file('query.png', 'not an image\n')),
      q('q09_unknown_split', '`--split=val`', ('val', 'split'), text + ['--split=val']),
      q('q10_coarse_dim_beyond', '`--coarse_dim=128` (the head has 64)', ('coarse_dim',), text + ['--coarse_dim=128']),
      q('q11_shortlist_0', '`--shortlist=0`', ('shortlist',), text + ['--shortlist=0']),
      q('q12_bad_backend', '`--backend=fast`', ('backend',), text + ['--backend=fast']),
      q('q13_image_dir_all_corrupt', '`--image_dir` whose 2 .png files are text', ('photos',),
        text + ['--image_dir=CASE/photos'], image_dir(0, 2)),
      q('q14_config_mismatch', '`--config=configs/default.py` for the tiny run', ('model.',),
        text + ['--config=configs/default.py']),
      q('q15_no_query', 'no `--text` and no `--image`', ('--text', 'text'), []),
      q('q16_garbage_config_json', 'WORKDIR/config.json holds garbage', ('config.json',), text,
        write_file('run/config.json', '{"batch_size": 32, "seed"')),
      q('q17_byte_flip', 'one byte flipped in the biggest file of checkpoint 6', ('differs from its checksum',), text,
        damaged_checkpoint()),
      q('q18_k_beyond_gallery', '`--k=1000` (the test gallery has 64 images)', ('k', '64'), text + ['--k=1000']),
  ]


def all_cases() -> list[Case]:
  return config_cases() + command_line_cases() + data_cases() + workdir_cases() + signal_cases() + query_cases()


# ----------------------------------------------------------------------------------------------------
# Prerequisites and the scheduler.

SCRATCH: Scratch = None  # type: ignore  (set in main)
DONE: dict[str, threading.Event] = {}


def prepare_data() -> None:
  code = ('from configs import tiny; from hivlp_jax.data import embedded_scenes, pipeline; '
          f'embedded_scenes.EmbeddedScenes(data_dir={str(SCRATCH.data)!r}, config="tiny").download_and_prepare(); '
          f'c = tiny.get_config(); c.data.data_dir = {str(SCRATCH.data)!r}; pipeline.get_tokenizer(c)')
  out = run_command([sys.executable, '-c', code])
  if out.status or not SCRATCH.vocab.exists():
    raise RuntimeError(f'Generating the tiny data set failed:\n{out.text[-3000:]}')


def train_base() -> None:
  out = run_command(main_argv(SCRATCH.base, []))
  if out.status or steps_of(SCRATCH.base) != [3, 6]:
    raise RuntimeError(f'The base run failed (steps {steps_of(SCRATCH.base)}):\n{out.text[-3000:]}')
  add_noise(out.text)


def query_ok() -> None:
  out = run_command(query_argv(SCRATCH.base, ['--text=a small red circle']))
  if out.status:
    raise RuntimeError(f'The good query failed:\n{out.text[-3000:]}')
  add_noise(out.text)
  shutil.rmtree(SCRATCH.base / 'indexes', ignore_errors=True)


PREREQUISITES = {'data': (prepare_data, ()), 'base': (train_base, ('data',)),
                 'flickr_damaged': (shared_run('flickr_damaged', damaged_flickr, ['--config.data.manual_dir=CASE/manual']),
                                    ('data', 'base')),
                 'web_damaged': (shared_run('web_damaged', damaged_shards, WEB_ARGS, convert=True), ('data', 'base')),
                 'query_ok': (query_ok, ('base',))}


@dataclasses.dataclass
class Task:
  name: str
  needs: tuple[str, ...]
  run: Callable[[], object]  # Returns a Row, None (a prerequisite), or a Task to run next.
  row: Optional[Row] = None
  error: str = ''


def schedule(tasks: list[Task], workers: int) -> None:
  """Runs tasks `workers` at a time, each once its needs are done, in list order otherwise."""
  pending, done, lock = list(tasks), set(), threading.Condition()  # tasks: updated with the second parts.
  failed: dict[str, str] = {}

  def next_task() -> Optional[Task]:
    with lock:
      while pending:
        for task in pending:
          if set(task.needs) <= done:
            pending.remove(task)
            return task
        lock.wait()
      return None

  def worker():
    while (task := next_task()) is not None:
      bad = [n for n in task.needs if n in failed]
      try:
        if bad:
          raise RuntimeError(f'not run: {bad[0]} failed')
        result = task.run()
        if isinstance(result, Task):  # A second part, run once its needs are done.
          with lock:
            pending.insert(0, result)
            tasks[tasks.index(task)] = result
            lock.notify_all()
          continue
        task.row = result
        print(f'{time.strftime("%H:%M:%S")} {task.name}: '
              f'{task.row.form + ": " + task.row.response[:110] if task.row else "done"}', flush=True)
      except Exception:  # pylint: disable=broad-except
        task.error = traceback.format_exc()
        failed[task.name] = task.error
        print(f'{task.name} FAILED:\n{task.error[-2000:]}', flush=True)
      with lock:
        done.add(task.name)
        if task.name in DONE:
          DONE[task.name].set()
        lock.notify_all()

  threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()


def select(cases: list[Case], only: list[str]) -> list[Case]:
  if not only:
    return cases
  return [c for c in cases if any(c.kind == o or fnmatch.fnmatch(c.id, o) or c.id.startswith(o) for o in only)]


# ----------------------------------------------------------------------------------------------------
# The page.


def _cell(text: str, limit: int = 420) -> str:
  text = ' '.join(str(text).split())
  if len(text) > limit:
    text = text[:limit - 1] + '…'
  return text.replace('|', '\\|')


def user_sees_cell(row: Row) -> str:
  prefix = 'validate accepts it; `main`: ' if row.how.startswith('config_lib.validate accepts') else ''
  if row.form == 'error':
    where = f'exit {row.exit_status}' if row.exit_status is not None else 'raises'
    if row.traceback_lines:
      where += f', after a {row.traceback_lines}-line traceback'
    return f'{prefix}{where}: {row.response}'
  if row.form in ('accepted', 'info'):
    status = f' (exit {row.exit_status})' if row.exit_status is not None else ''
    said = 'no warning or error; it logs' if row.form == 'info' else 'no warning or error; it prints'
    return f'{prefix}runs{status}, {said}: {row.response}' if row.response else f'{prefix}accepted{status}'
  return f'{prefix}{row.form}: {row.response}' + (f' (exit {row.exit_status})' if row.exit_status else '')


def merged_rows(rows: list[Row], command: str, seconds: float) -> tuple[list[Row], str, float]:
  """The rows of OUT_DIR/bad_inputs.json with `rows` in place of (or added to) theirs, in the cases' order, less
  those of cases this script no longer has; the command that made them (the recorded one, then this one) and
  the seconds of both."""
  from hivlp_jax import files  # pylint: disable=g-import-not-at-top
  recorded = files.read_json(files.path(FLAGS.out_dir) / 'bad_inputs.json')
  order = [c.id for c in all_cases()]
  by_id = {r['id']: Row(**{**r, 'names': tuple(r['names'])}) for r in recorded['rows'] if r['id'] in order}
  by_id.update({r.id: r for r in rows})
  ordered = sorted(by_id.values(), key=lambda r: order.index(r.id))
  return ordered, f'{recorded["command"]} ({recorded["date"]}), then {command}', recorded['seconds'] + seconds


def write_page(rows: list[Row], out_dir: str, command: str, seconds: float) -> None:
  from hivlp_jax import files  # pylint: disable=g-import-not-at-top
  date = time.strftime('%Y-%m-%d')
  files.write_json(files.path(out_dir) / 'bad_inputs.json', {'command': command, 'date': date, 'seconds': round(seconds),
                                                 'rows': [dataclasses.asdict(r) for r in rows]})
  clear = sum(r.clear == 'yes' for r in rows)
  skips = sum(r.form == 'counted skip' for r in rows)
  tracebacks = [r for r in rows if r.traceback_lines]
  unclear = [r for r in rows if r.clear != 'yes']
  lossy = [r for r in rows if not r.lost.startswith('nothing')]
  lines = [
      '# Every bad input named', '',
      f'Made by `{command}` on {date} ({len(rows)} rows, {seconds / 60:.1f} minutes on this machine; the raw '
      'output of each row is in [bad_inputs.json](bad_inputs.json)).', '',
      'Each row is one bad input, met the way a new user would meet it. Command-line rows run '
      '`python -m hivlp_jax.main --config=configs/tiny.py --workdir=WORKDIR --config.data.data_dir=DATA_DIR` plus the '
      'bad input (data rows: `--config=TINY_STREAMED.py`, the tiny model on a Flickr30K-layout MANUAL_DIR, with the '
      'tiny run\'s vocabulary; web-shard rows add `--config.data.name=webdataset --config.data.shards=CASE/shards_ar/*.array_record '
      '--config.data.eval_name=flickr30k`). Query rows run `python -m hivlp_jax.query --workdir=WORKDIR '
      '--text="a small red circle"` plus the bad input, on a copy of a tiny run trained for 6 steps (checkpoints 3 and '
      '6); so do the workdir and checkpoint rows with `main`. Config rows call `config_lib.validate` in-process, '
      'the check `main` runs first; from the command line the same message is printed as one line, as the command-line '
      'rows show. A config value that validate accepts is then run with `main` as well. Two runs serve several '
      'rows each (marked *one run for several rows* in the JSON): a Flickr30K manual dir with three damaged training '
      'images, and web shards with six damaged samples or shards; each of those rows reads the lines that name its '
      'own example.', '',
      '*What the user sees*: the error line of a failed command (after its traceback, if any); else the first '
      'warning, logged error or skipped-example line that the good runs do not print; else the command\'s first '
      'output line (or, for a run that goes on, its lines on resuming, stopping and results). *Clear*: that '
      'message contains the field, flag or file name of the input (judged by the script). '
      '*Lost*: checkpoints moved aside or deleted, steps trained again, examples skipped, a run that failed after '
      'training. Paths are placeholders: WORKDIR (the run), CASE (the row\'s scratch folder), DATA_DIR, MANUAL_DIR, '
      'COCO_DIR, BASE_RUN, TMP.', '',
      f'**{clear} of {len(rows)}** messages name the input ({skips} of them counted skips); '
      f'{len(unclear)} do not; {len(tracebacks)} come after a Python traceback; {len(lossy)} rows lose something.', '',
      '| # | Kind | Bad input | What the user sees | Clear, names the input | Lost |',
      '|---|---|---|---|---|---|',
  ]
  for row in rows:
    lines.append(f'| {row.id.split("_")[0]} | {row.kind} | {_cell(row.bad_input, 200)} | {_cell(user_sees_cell(row))} | {row.clear} | '
                 f'{_cell(row.lost, 300)} |')
  lines += ['', '## Rows that do not name the input, or lose something', '']
  for row in rows:
    if row.clear != 'yes' or not row.lost.startswith('nothing'):
      why = [] if row.clear == 'yes' else ['no clear message']
      why += [] if row.lost.startswith('nothing') else [f'lost: {row.lost}']
      lines.append(f'- {row.id.split("_")[0]} ({row.kind}, {_cell(row.bad_input, 200)}): {_cell("; ".join(why), 400)}. '
                   f'Sees: {_cell(user_sees_cell(row))}')
  lines += ['', '## Errors that come after a traceback', '',
            'The message is the last line of a Python traceback rather than a one-line error:', '']
  lines += [f'- {r.id.split("_")[0]}: {r.traceback_lines} lines, then `{_cell(r.response, 200)}`'
            f'{"" if r.clear == "yes" else " (does not name the input)"}' for r in tracebacks] or ['(none)']
  files.write_text(files.path(out_dir) / 'bad_inputs.md', '\n'.join(lines) + '\n')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  global SCRATCH
  start = time.perf_counter()
  SCRATCH = Scratch(pathlib.Path(tempfile.mkdtemp(prefix='bad_inputs_')))
  print(f'Scratch directory: {SCRATCH.root}', flush=True)
  try:
    write_shared_files(SCRATCH)
    cases = select(all_cases(), FLAGS.only)
    if not cases:
      raise app.UsageError(f'--only={",".join(FLAGS.only)} selects no case.')
    needed, frontier = set(), {n for c in cases for n in c.needs}
    if any(c.run is run_validate for c in cases):
      frontier.add('base')  # A config value that validate accepts is then run (after the base run).
    while frontier:
      name = frontier.pop()
      needed.add(name)
      if name in PREREQUISITES:
        frontier |= set(PREREQUISITES[name][1]) - needed
    for name in PREREQUISITES:
      DONE[name] = threading.Event()
    tasks = [Task(n, PREREQUISITES[n][1], PREREQUISITES[n][0]) for n in PREREQUISITES if n in needed]
    for case in cases:
      case_dir = SCRATCH.root / 'cases' / case.id
      case_dir.mkdir(parents=True)
      tasks.append(Task(case.id, case.needs, lambda c=case, d=case_dir: c.run(c, d)))
    schedule(tasks, FLAGS.workers)
    failed = [t for t in tasks if t.error and t.name in PREREQUISITES]
    if failed:
      raise RuntimeError(f'Prerequisite {failed[0].name} failed:\n{failed[0].error[-3000:]}')
    by_id = {t.name: t for t in tasks}
    rows = []
    for case in select(all_cases(), FLAGS.only):
      task = by_id[case.id]
      if task.row is None:
        task.row = Row(case.id, case.kind, case.bad_input, 'not run', form='error',
                       response='the bad-input script failed on this case: ' + task.error.strip().splitlines()[-1],
                       clear='no', lost='unknown')
      rows.append(task.row)
    command = 'python benchmarks/bad_inputs.py' + (f' --only={",".join(FLAGS.only)}' if FLAGS.only else '') + (
        f' --out_dir={FLAGS.out_dir}' if FLAGS.out_dir != 'docs' else '')
    seconds = time.perf_counter() - start
    if FLAGS.merge:
      rows, command, seconds = merged_rows(rows, command + ' --merge', seconds)
    write_page(rows, FLAGS.out_dir, command, seconds)
    print(f'Wrote {FLAGS.out_dir}/bad_inputs.md and bad_inputs.json: {len(rows)} rows in '
          f'{(time.perf_counter() - start) / 60:.1f} minutes.')
  finally:
    for process in list(RUNNING):
      process.kill()
    if not FLAGS.keep_scratch:
      shutil.rmtree(SCRATCH.root, ignore_errors=True)


if __name__ == '__main__':
  app.run(main)
