r"""This project's train step against open_clip's at one matched two-tower config, side by side on the CPU.

  python benchmarks/versus_open_clip.py --rounds=5 --out=benchmarks/results/versus_open_clip.json \
      [--open_clip_python=.venv-bench/bin/python]

Both sides train the same shapes (3.90M parameters each): a ViT (patch 8, 32 px, width 192, 4 layers,
3 heads, MLP 768) and a text Transformer (32 tokens, vocabulary 1000, width 192, 4 layers, 3 heads, MLP
768), embeddings of 256, the in-batch softmax contrastive loss, AdamW (lr 1e-3, betas 0.9/0.98, weight
decay 0.05), gradients clipped at norm 1, float32, global batch 256 of synthetic uint8 images and token
ids. This project's side is `benchmarks/train_step.py` on `configs/default.py` with the widths above (its
nested head: a loss at each of dims 16-256, as users train it; --one_dim for a single full-dim loss), on 1
and 2 simulated devices. open_clip's side is `open_clip.CLIP` with `ClipLoss` and torch's fused AdamW on
torch's threads (one per core), eagerly and under `torch.compile` (its strongest CPU setting here).

A side named with the suffix `+hugepages` runs with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (as
`HIVLP_HUGEPAGES=1 launch/local.sh` sets for CPU runs): malloc backs its large blocks with transparent huge
pages, so memory that a step maps afresh costs a page fault per 2 MB instead of per 4 KB.

Every side runs in its own process; each round runs every side once, in an order rotated by the round,
so slow spells of a noisy machine fall on all sides alike. Reported: each side's median step (of --steps
timed steps after --warmup) per round, the median over rounds, and this project's speed over open_clip's
best side, per round and as the median of those per-round ratios.

open_clip is not a dependency of the package (requirements-bench.txt): torch's PyPI wheel brings several
GB of CUDA libraries, so it is best installed in its own environment, named with --open_clip_python.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags; defined when run as a script, so the tests can import the module beside
  other benchmarks that define flags of the same names."""
  flags.DEFINE_integer('rounds', 3, 'Rounds over every side, interleaved.')
  flags.DEFINE_integer('steps', 10, 'Timed steps per side and round.')
  flags.DEFINE_integer('warmup', 3, 'Untimed steps first (compilation, allocator warm-up).')
  flags.DEFINE_list('sides', ['jax_2_devices', 'jax_2_devices+hugepages', 'open_clip', 'open_clip_compiled',
                              'open_clip_compiled+hugepages'],
                    'Sides to time: jax_<n>_device(s), open_clip, open_clip_compiled, each optionally +hugepages.')
  flags.DEFINE_string('open_clip_python', sys.executable, 'Python interpreter that has open_clip_torch installed.')
  flags.DEFINE_bool('one_dim', False, "This project's side with one full-dim loss instead of the nested head.")
  flags.DEFINE_string('out', 'benchmarks/results/versus_open_clip.json', 'Where to write the JSON.')
  flags.DEFINE_string('side', '', 'Internal: time this one side in this process and print its result.')


# The matched shapes (see the docstring).
WIDTH, DEPTH, HEADS, MLP, PATCH, IMAGE, TOKENS, VOCAB, EMBED, BATCH = 192, 4, 3, 768, 8, 32, 32, 1000, 256, 256
LEARNING_RATE, BETAS, WEIGHT_DECAY, CLIP_NORM = 1e-3, (0.9, 0.98), 0.05, 1.0
HUGEPAGES_SUFFIX = '+hugepages'


def jax_overrides(one_dim: bool) -> list[str]:
  """configs/default.py with open_clip's side's shapes and optimizer."""
  overrides = {'batch_size': BATCH, 'model.image_size': IMAGE, 'model.embed_dim': EMBED,
               'model.image.patch_size': PATCH, 'model.text.max_len': TOKENS,
               'optimizer.learning_rate': LEARNING_RATE, 'optimizer.b1': BETAS[0], 'optimizer.b2': BETAS[1],
               'optimizer.weight_decay': WEIGHT_DECAY, 'optimizer.grad_clip_norm': CLIP_NORM}
  for tower in ('image', 'text'):
    overrides.update({f'model.{tower}.width': WIDTH, f'model.{tower}.depth': DEPTH,
                      f'model.{tower}.num_heads': HEADS, f'model.{tower}.mlp_dim': MLP})
  if one_dim:
    overrides.update({'model.nested_dims': f'({EMBED},)', 'loss.dim_weights': '(1.0,)'})
  return [f'--config.{k}={v}' for k, v in overrides.items()]


def time_jax(devices: int) -> dict:
  """benchmarks/train_step.py in a child process with `devices` simulated CPU devices."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'step.jsonl')
    command = [sys.executable, os.path.join(REPO, 'benchmarks', 'train_step.py'),
               f'--config={os.path.join(REPO, "configs", "default.py")}', f'--steps={FLAGS.steps}',
               f'--warmup_steps={FLAGS.warmup}', f'--vocab_size={VOCAB}', f'--out={out}'] + jax_overrides(FLAGS.one_dim)
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    run = subprocess.run(command, env=env, capture_output=True, text=True, check=False, cwd=REPO)
    if run.returncode:
      raise RuntimeError(f'{" ".join(command)} failed:\n{run.stderr[-3000:]}')
    with open(out) as f:
      result = json.loads(f.readline())
  return {'median_step_s': result['median_step_s'], 'params_millions': result['params_millions'],
          'step_gflops': result['step_gflops'], 'jax': result['jax'], 'devices': devices}


def time_open_clip(compiled: bool) -> dict:
  """Median step of open_clip's CLIP at the matched shapes, in this process."""
  # pylint: disable=g-import-not-at-top  (torch only where this side runs)
  import numpy as np
  import open_clip
  from open_clip.model import CLIPTextCfg, CLIPVisionCfg
  import torch
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  model = open_clip.CLIP(
      embed_dim=EMBED,
      vision_cfg=CLIPVisionCfg(layers=DEPTH, width=WIDTH, head_width=WIDTH // HEADS, mlp_ratio=MLP / WIDTH,
                               patch_size=PATCH, image_size=IMAGE),
      text_cfg=CLIPTextCfg(context_length=TOKENS, vocab_size=VOCAB, width=WIDTH, heads=HEADS, layers=DEPTH,
                           mlp_ratio=MLP / WIDTH))
  params = sum(p.numel() for p in model.parameters())
  forward = torch.compile(model) if compiled else model
  loss_fn = open_clip.ClipLoss()
  optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=BETAS, weight_decay=WEIGHT_DECAY,
                                fused=True)
  rng = np.random.default_rng(0)
  images = torch.from_numpy(rng.integers(0, 256, (BATCH, 3, IMAGE, IMAGE), dtype=np.uint8))
  texts = torch.from_numpy(rng.integers(5, VOCAB, (BATCH, TOKENS)).astype(np.int64))
  mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)

  def step():  # As open_clip's train_one_epoch: normalise, forward, loss, backward, clip, AdamW.
    image_features, text_features, logit_scale = forward((images.float() / 255 - mean) / std, texts)[:3]
    loss = loss_fn(image_features, text_features, logit_scale)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
    optimizer.step()
    with torch.no_grad():  # open_clip clamps the learnable temperature after every step.
      model.logit_scale.clamp_(0, 4.6052)
    return loss.item()

  for _ in range(FLAGS.warmup):
    step()
  times = []
  for _ in range(FLAGS.steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return {'median_step_s': statistics.median(times), 'params_millions': params / 1e6,
          'torch': torch.__version__, 'open_clip': open_clip.__version__, 'threads': torch.get_num_threads()}


def time_side(side: str) -> dict:
  if side.startswith('jax_'):
    return time_jax(int(side.split('_')[1]))
  if side in ('open_clip', 'open_clip_compiled'):
    return time_open_clip(compiled=side == 'open_clip_compiled')
  raise ValueError(f'--sides: unknown side {side!r}; use jax_<n>_device(s), open_clip or open_clip_compiled.')


def run_side(side: str) -> dict:
  """`side` timed in a fresh process (open_clip's in --open_clip_python)."""
  python = FLAGS.open_clip_python if side.startswith('open_clip') else sys.executable
  base, hugepages = side.removesuffix(HUGEPAGES_SUFFIX), side.endswith(HUGEPAGES_SUFFIX)
  from hivlp_jax import host_memory  # pylint: disable=g-import-not-at-top  (the open_clip side's Python may lack it)
  env = host_memory.with_hugepages(os.environ, enabled=hugepages)
  command = [python, os.path.abspath(__file__), f'--side={base}', f'--steps={FLAGS.steps}',
             f'--warmup={FLAGS.warmup}'] + (['--one_dim'] if FLAGS.one_dim else [])
  run = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO, env=env)
  lines = [line for line in run.stdout.splitlines() if line.startswith('RESULT ')]
  if run.returncode or not lines:
    raise RuntimeError(f'{" ".join(command)} failed:\n{run.stderr[-3000:]}')
  return json.loads(lines[-1].removeprefix('RESULT '))


def summarise(rounds: list[dict]) -> dict:
  """Median step per side over rounds, and this project's speed over open_clip's best side."""
  sides = list(rounds[0])
  median = {s: statistics.median(r[s]['median_step_s'] for r in rounds) for s in sides}
  ours = [s for s in sides if s.startswith('jax_')]
  theirs = [s for s in sides if s.startswith('open_clip')]
  summary = {'median_step_s': median, 'examples_per_s': {s: BATCH / t for s, t in median.items()}}
  if ours and theirs:
    # Per round: this project's best side against open_clip's best side of the same round.
    ratios = [min(r[s]['median_step_s'] for s in theirs) / min(r[s]['median_step_s'] for s in ours)
              for r in rounds]
    summary.update(speedup_per_round=ratios, speedup_median=statistics.median(ratios),
                   speedup_range=[min(ratios), max(ratios)])
  return summary


def table(summary: dict, rounds: list[dict]) -> str:
  lines = ['| side | median step s (of rounds) | per round | examples/s |', '|---|---|---|---|']
  for side, step in summary['median_step_s'].items():
    per_round = ', '.join(f'{r[side]["median_step_s"]:.3f}' for r in rounds)
    lines.append(f'| {side} | {step:.3f} | {per_round} | {summary["examples_per_s"][side]:.0f} |')
  if 'speedup_median' in summary:
    low, high = summary['speedup_range']
    lines.append(f'\nThis project over open_clip (best side each, per round): median {summary["speedup_median"]:.2f}x '
                 f'(range {low:.2f}-{high:.2f}x over {len(rounds)} rounds).')
  return '\n'.join(lines)


def main(argv):
  del argv
  if FLAGS.side:
    print('RESULT ' + json.dumps(time_side(FLAGS.side)), flush=True)
    return
  rounds = []
  for index in range(FLAGS.rounds):
    order = FLAGS.sides[index % len(FLAGS.sides):] + FLAGS.sides[:index % len(FLAGS.sides)]
    results = {}
    for side in order:
      results[side] = run_side(side)
      print(f'[round {index + 1}/{FLAGS.rounds}] {side}: {results[side]["median_step_s"]:.3f} s per step', flush=True)
    rounds.append({side: results[side] for side in FLAGS.sides})
  summary = summarise(rounds)
  text = table(summary, rounds)
  print(text)
  from hivlp_jax import files  # pylint: disable=g-import-not-at-top  (the open_clip side's Python may lack it)
  files.write_json(FLAGS.out, {'machine': {'cpus': os.cpu_count(), 'processor': platform.processor() or
                                           platform.machine()},
                               'steps': FLAGS.steps, 'warmup': FLAGS.warmup, 'one_dim': FLAGS.one_dim,
                               'rounds': rounds, 'summary': summary, 'table': text})
  print(f'Wrote {FLAGS.out}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
