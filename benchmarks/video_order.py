r"""Does a video model see frame order? Recall on the embedded test clips that come with their reverse.

  python benchmarks/video_order.py --workdirs=runs/video_mean,runs/video \
      --out=docs/video_order.json

Half the embedded test clips are followed by the same clip played backwards, whose captions say the
opposite direction (data/moving_scenes.py): a model blind to frame order (temporal 'mean') cannot tell
such a pair apart. For each trained workdir (its WORKDIR/config.json and newest checkpoint), on the clips
in reversed pairs:
- t2v_r1 / v2t_r1: R@1 of their captions over the whole test gallery, and of the clips over every test
  caption (the evaluator's tie rule: a tie counts against the query);
- t2v_order / v2t_order: how often the right direction outranks the reversed one: a caption scores its
  own clip above the clip's reverse, or a clip scores one of its captions above one of its reverse's (every
  pair of them). A tie counts half, so a model that cannot tell the two apart reads 0.5, chance.
Each order is also read by what tells the pair apart (`moving_scenes.reversal_kind`): 'motion' only (the
direction, seen only across frames), or a 'size' or 'colour' change (the first frame differs from the last).
Read at the full dim and at --dims (prefix re-normalised, as the evaluator's exact search).
"""

from absl import app
from absl import flags
import numpy as np

from hivlp_jax import files
from hivlp_jax.data import moving_scenes

FLAGS = flags.FLAGS
flags.DEFINE_list('workdirs', [], 'Trained video runs (each with its config.json and a checkpoint).')
flags.DEFINE_list('dims', ['32'], 'Coarse dims read besides the full one.')
flags.DEFINE_string('out', '', 'JSON results (default: none, the table only).')


def order_metrics(clips: np.ndarray, texts: np.ndarray, text_clip_ids: np.ndarray, reverse_of: np.ndarray,
                  kinds: np.ndarray = None) -> dict[str, float]:
  """Metrics of the clips in reversed pairs, from unit embeddings clips [N, D] and texts [N * C, D].

  text_clip_ids int [N * C]: the clip of each caption; reverse_of int [N]: the clip a clip plays backwards,
  -1 for none. Returns 't2v_r1', 'v2t_r1', 't2v_order', 'v2t_order' and 'pairs'. With kinds str [N] (what
  tells a clip from its reverse, `moving_scenes.reversal_kind`), also 't2v_order_<kind>', 'v2t_order_<kind>'
  and 'pairs_<kind>' over the pairs of each kind.
  """
  from hivlp_jax import ranking  # pylint: disable=g-import-not-at-top  (jax starts only where it is needed)
  backward = np.flatnonzero(reverse_of >= 0)
  partner = np.full(len(reverse_of), -1)
  partner[backward], partner[reverse_of[backward]] = reverse_of[backward], backward
  paired = np.flatnonzero(partner >= 0)
  captions = np.flatnonzero(np.isin(text_clip_ids, paired))
  t2v = texts[captions] @ clips.T  # [captions of paired clips, N]
  t2v_ranks = ranking.best_positive_ranks(t2v, text_clip_ids[captions][:, None] == np.arange(len(clips)))
  v2t = clips[paired] @ texts.T  # [paired clips, N * C]
  v2t_ranks = ranking.best_positive_ranks(v2t, paired[:, None] == text_clip_ids[None, :])
  own = t2v[np.arange(len(captions)), text_clip_ids[captions]]
  reverse = t2v[np.arange(len(captions)), partner[text_clip_ids[captions]]]
  per_clip = texts.reshape(len(clips), -1, texts.shape[1])  # [N, C, D]: captions are grouped by clip.
  own_scores = np.einsum('pd,pcd->pc', clips[paired], per_clip[paired])  # [P, C]
  reverse_scores = np.einsum('pd,pcd->pc', clips[paired], per_clip[partner[paired]])
  versus = own_scores[:, :, None] - reverse_scores[:, None, :]  # Every own caption against every reverse one.
  credit = lambda d: (d > 0) + 0.5 * (d == 0)
  t2v_credit = credit(own - reverse)  # [captions of paired clips]
  v2t_credit = credit(versus).mean(axis=(1, 2))  # [paired clips]: every clip has as many comparisons.
  metrics = {'t2v_r1': ranking.recall_at_k(t2v_ranks, (1,))[1], 'v2t_r1': ranking.recall_at_k(v2t_ranks, (1,))[1],
             't2v_order': float(t2v_credit.mean()), 'v2t_order': float(v2t_credit.mean()), 'pairs': len(paired) // 2}
  for kind in ([] if kinds is None else sorted(set(kinds[paired]))):
    metrics[f't2v_order_{kind}'] = float(t2v_credit[kinds[text_clip_ids[captions]] == kind].mean())
    metrics[f'v2t_order_{kind}'] = float(v2t_credit[kinds[paired] == kind].mean())
    metrics[f'pairs_{kind}'] = int(np.sum(kinds[paired] == kind)) // 2
  return metrics


def run_metrics(workdir: str, dims: list[int]) -> dict[str, dict]:
  """{'dim{d}': order_metrics} of a trained run's newest checkpoint on its evaluation split."""
  import flax  # pylint: disable=g-import-not-at-top
  from hivlp_jax import evaluate, evaluators, gallery, retrieval, train_step  # pylint: disable=g-import-not-at-top
  from hivlp_jax.data import embedded_videos, pipeline  # pylint: disable=g-import-not-at-top
  config = gallery.config_from_workdir(workdir)
  if config.data.name != 'embedded_videos':
    raise SystemExit(f'{workdir} trained on {config.data.name!r}, not the embedded clips.')
  tokenizer = pipeline.trained_run_tokenizer(config, workdir)
  model = train_step.create_model(config, tokenizer.vocab_size)
  params, step = evaluators.restore_params(workdir, config, model)
  embed_clips, embed_texts = (lambda x, f=f: f(flax.jax_utils.replicate(params), x)
                              for f in evaluators.make_pmapped_embedders(model))
  data = pipeline.load_split(config, config.eval.split, tokenizer)
  clips, texts, text_clip_ids = evaluate.embed_split(embed_clips, embed_texts, data, config.eval.batch_size)
  reverse_of = embedded_videos.load_split(config.data.data_dir, config.eval.split,
                                          config.data.builder_config)['reverse_of']
  generated = moving_scenes.generate_clips(config.eval.split, len(reverse_of))  # What the builder packaged.
  if [c.reverse_of for c in generated] != list(reverse_of):
    raise SystemExit(f'The {config.eval.split} split in {config.data.data_dir} is not what data/moving_scenes.py '
                     'generates now: delete it to have it built again.')
  kinds = np.array([moving_scenes.reversal_kind(c.objects) for c in generated])
  results = {'step': step, 'temporal': config.model.video.temporal}
  for dim in dims:
    unit = lambda x, d=dim: retrieval.normalized_prefix_np(x, d)
    results[f'dim{dim}'] = order_metrics(unit(clips), unit(texts), text_clip_ids, reverse_of, kinds)
  return results


def table(results: dict[str, dict]) -> str:
  kinds = moving_scenes.REVERSAL_KINDS
  lines = ['| run | temporal | dim | pairs | t2v R@1 | v2t R@1 | t2v order | v2t order | '
           + ' | '.join(f't2v / v2t order, {k} (pairs)' for k in kinds) + ' |',
           '|---' * (8 + len(kinds)) + '|']
  for workdir, run in results.items():
    for key, m in run.items():
      if key.startswith('dim'):
        by_kind = ' | '.join(f'{m[f"t2v_order_{k}"]:.3f} / {m[f"v2t_order_{k}"]:.3f} ({m[f"pairs_{k}"]})'
                             if f'pairs_{k}' in m else '-' for k in kinds)
        lines.append(f'| {workdir} | {run["temporal"]} | {key[3:]} | {m["pairs"]} | {m["t2v_r1"]:.1f} | '
                     f'{m["v2t_r1"]:.1f} | {m["t2v_order"]:.3f} | {m["v2t_order"]:.3f} | {by_kind} |')
  return '\n'.join(lines)


def main(argv):
  del argv
  if not FLAGS.workdirs:
    raise app.UsageError('--workdirs: one or more trained video runs.')
  from hivlp_jax import gallery  # pylint: disable=g-import-not-at-top
  results = {}
  for workdir in FLAGS.workdirs:
    full = gallery.config_from_workdir(workdir).model.embed_dim
    results[workdir] = run_metrics(workdir, [full] + [int(d) for d in FLAGS.dims])
  print(table(results))
  if FLAGS.out:
    files.write_json(FLAGS.out, results)


if __name__ == '__main__':
  app.run(main)
