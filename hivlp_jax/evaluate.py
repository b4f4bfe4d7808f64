"""Retrieval evaluation: embed a split, index it with each retrieval mode, compute recall.

Protocol (Flickr30K/COCO): image-to-text is a hit when any of the image's captions is in the top K;
text-to-image when the caption's one image is. RSUM is the sum of R@1/5/10 both ways; the median rank
(MedR, 1-based) is that of each query's best positive, MnR its mean. Ranks come a block of queries at a time
(`ranking.rank_queries`): no [queries, gallery] matrix is held. Clips are evaluated as images are, their
directions named as video retrieval names them: 'v2t' (clip queries) and 't2v' (caption queries).
"""

import re
import time
from typing import Callable, Mapping, Optional, Sequence

from absl import logging
import jax
import numpy as np

from hivlp_jax import coarse_to_fine
from hivlp_jax import errors
from hivlp_jax import files
from hivlp_jax import gallery_shards
from hivlp_jax import ranking
from hivlp_jax import retrieval
from hivlp_jax import tuning
from hivlp_jax.data import pipeline


def check_finite(embeddings: Mapping[str, np.ndarray], step: Optional[int] = None) -> None:
  """Raises ValueError naming the checkpoint `step` when an embedding [N, D] of `embeddings` (name ->
  array) holds a NaN or inf: recall over such embeddings would measure nothing."""
  for name, array in embeddings.items():
    bad_rows = np.flatnonzero(~np.all(np.isfinite(array), axis=-1))
    if bad_rows.size:
      at = 'an unknown checkpoint step' if step is None else f'checkpoint step {step}'
      raise errors.InputError(f'{bad_rows.size} of {len(array)} {name} embeddings at {at} are not finite (NaN or '
                              f'inf; the first is row {bad_rows[0]}): the model has diverged or its parameters are '
                              'damaged.')


IMAGE_DIRECTIONS = ('i2t', 't2i')  # (visual queries over the captions, caption queries over the visuals).
VIDEO_DIRECTIONS = ('v2t', 't2v')


def _directions(image_embeddings: np.ndarray, text_embeddings: np.ndarray, text_image_ids: np.ndarray,
                names: Sequence[str] = IMAGE_DIRECTIONS):
  """(name, queries, gallery, positive ids int [Q, P]) for image-to-text, then text-to-image, named `names`."""
  i2t, t2i = ranking.positives_per_query(text_image_ids, image_embeddings.shape[0])
  return ((names[0], image_embeddings, text_embeddings, i2t), (names[1], text_embeddings, image_embeddings, t2i))


def _rank_metrics(rankings: Mapping[str, ranking.Ranking], ks: Sequence[int]) -> dict[str, float]:
  """'{direction}_r{k}' for each direction and k (rankings: direction -> its `ranking.Ranking`), 'rsum',
  'mean_recall', '{direction}_medr' and '{direction}_mnr'."""
  metrics = {}
  for name, ranked in rankings.items():
    metrics.update({f'{name}_r{k}': v for k, v in ranking.recall_at_k(ranked.ranks, ks).items()})
  metrics['rsum'] = sum(metrics.values())  # The recalls only (percent), in the order they have always been summed.
  metrics['mean_recall'] = metrics['rsum'] / (2 * len(ks))
  metrics.update({f'{name}_medr': ranking.median_rank(ranked.ranks) for name, ranked in rankings.items()})
  metrics.update({f'{name}_mnr': ranking.mean_rank(ranked.ranks) for name, ranked in rankings.items()})
  return metrics


TUNING_QUERIES = 1000  # Queries of a direction sampled to tune its index to config.eval.scann.target_recall.


def tuned_index(index: retrieval.Index, queries: np.ndarray, gallery: np.ndarray, target_recall: float):
  """(`index` at its cheapest setting whose recall@10 of exact search reaches `target_recall` on a sample of
  `queries`, its `tuning.OperatingPoint`). Only exact search's neighbours are used, never the positives: the
  index is tuned to agree with exact search, not to the test labels. Shortlists are the mode's or longer."""
  picked = np.sort(np.random.default_rng(0).choice(len(queries), min(TUNING_QUERIES, len(queries)), replace=False))
  sample = queries[picked]
  shortlists = tuple(s for s in tuning.SHORTLISTS if s >= index.shortlist) or (index.shortlist,)
  return tuning.tune_index(index, sample, tuning.exact_top_k(gallery, sample), target_recall, shortlists)


def _rank_directions(mode: retrieval.RetrievalMode, directions, k: int,
                     shard: Optional[gallery_shards.Shard] = None, target_recall: float = 0.0):
  """(indexes, rankings, tuned): direction name -> the mode's index over its gallery (this process's share of
  it when `shard` is given), its `ranking.Ranking` (of the whole gallery), and with `target_recall` > 0 the
  operating point its index was tuned to (indexes with knobs only: the coarse-to-fine ones)."""
  indexes, rankings, tuned = {}, {}, {}
  for name, queries, gallery, positives in directions:
    start, stop = shard.bounds(len(gallery)) if shard is not None else (0, len(gallery))
    indexes[name] = mode.build(gallery[start:stop])
    if target_recall and hasattr(indexes[name], 'with_knobs') and stop - start > tuning.RECALL_K:
      indexes[name], tuned[name] = tuned_index(indexes[name], queries, gallery[start:stop], target_recall)
    rankings[name] = (ranking.rank_queries(indexes[name], queries, positives, k) if shard is None else
                      gallery_shards.rank_queries(indexes[name], shard, len(gallery), queries, positives, k))
  return indexes, rankings, tuned


def retrieval_metrics(image_embeddings: np.ndarray, text_embeddings: np.ndarray, text_image_ids: np.ndarray,
                      mode: retrieval.RetrievalMode, ks: Sequence[int] = (1, 5, 10),
                      directions: Sequence[str] = IMAGE_DIRECTIONS) -> dict[str, float]:
  """Recall both ways for one retrieval mode.

  Args:
    image_embeddings: [N, D]; text_embeddings: [T, D]; text_image_ids: int [T], the image of each caption.
  Returns:
    'i2t_r{k}', 't2i_r{k}' for each k, 'rsum', 'mean_recall', 'i2t_medr', 't2i_medr', 'i2t_mnr' and
    't2i_mnr', the directions named `directions` (VIDEO_DIRECTIONS for clips).
  """
  directions = _directions(image_embeddings, text_embeddings, text_image_ids, directions)
  return _rank_metrics(_rank_directions(mode, directions, max(ks))[1], ks)


def embed_split(embed_images: Callable, embed_texts: Callable, data: pipeline.ImageTextSplit, batch_size: int,
                shard: Optional[gallery_shards.Shard] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Embeds every image and caption of a split with pmapped embedding functions.

  `embed_images(images [devices, b, H, W, 3])` and `embed_texts(tokens [devices, b, L])` return
  [devices, b, D]. Returns image embeddings [N, D], text embeddings [N * captions, D] and the image
  id of each caption [N * captions]. With `shard` (a collective) this process embeds its share of the
  images and of the captions and the shares are all-gathered.
  """
  tokens = data.tokens.reshape(-1, data.tokens.shape[-1])
  text_image_ids = np.repeat(np.arange(data.num_images), data.captions_per_image)
  embedded = []
  for embed, inputs in ((embed_images, data.images), (embed_texts, tokens)):
    if shard is None:
      embedded.append(embed_batches(embed, inputs, batch_size))
    else:
      start, stop = shard.bounds(len(inputs))
      embedded.append(shard.all_rows(embed_batches(embed, inputs[start:stop], batch_size), len(inputs)))
  return embedded[0], embedded[1], text_image_ids


def embed_batches(embed: Callable, array: np.ndarray, batch_size: int) -> np.ndarray:
  """Runs a pmapped embedding function over `array` [N, ...] in padded batches -> [N, D].

  `embed(x [devices, b, ...])` returns [devices, b, D]. `batch_size` is rounded down to a multiple of the
  local device count (at least one row per device); the last batch is padded and its padding dropped.
  """
  devices = jax.local_device_count()
  batch_size = max(devices, batch_size // devices * devices)
  outputs = []
  for batch, mask in pipeline.padded_batches(array, batch_size):
    out = np.asarray(embed(pipeline.shard({'x': batch})['x']))
    outputs.append(out.reshape(batch_size, -1)[mask])
  return np.concatenate(outputs)


def validate_config(config, two_stage_backend: Optional[str] = None) -> None:
  """Raises ValueError naming the field when config.eval asks for retrieval the model cannot serve.

  Checks config.eval.two_stage ((coarse_dim, shortlist), ...), config.eval.funnel ((dim, shortlist), ...),
  config.eval.ks, config.eval.two_stage_backend (or `two_stage_backend`, when given) and config.eval.scann
  against the head: every dim must be in [1, config.model.embed_dim] (a larger one would silently search
  the full head under its own name); every shortlist and k positive.
  """
  embed_dim = config.model.embed_dim
  backend = two_stage_backend or config.eval.two_stage_backend
  if backend not in retrieval.BACKENDS:
    field = 'two_stage_backend' if two_stage_backend else 'config.eval.two_stage_backend'
    raise errors.InputError(f'{field}={backend!r} is not one of {retrieval.BACKENDS}.')
  retrieval.ScannSettings.from_config(config.eval.scann)  # Raises naming config.eval.scann.<field>.

  def check_stages(field: str, stages) -> list[tuple[int, int]]:
    pairs = []
    for i, stage in enumerate(stages):
      if len(stage) != 2 or not all(isinstance(x, (int, np.integer)) for x in stage):
        raise errors.InputError(f'{field}[{i}]={stage!r} is not a (dim, shortlist) pair of integers.')
      dim, shortlist = int(stage[0]), int(stage[1])
      if not 0 < dim <= embed_dim:
        raise errors.InputError(f'{field}[{i}]: dim {dim} is not in [1, config.model.embed_dim={embed_dim}].')
      if shortlist <= 0:
        raise errors.InputError(f'{field}[{i}]: shortlist {shortlist} must be positive.')
      pairs.append((dim, shortlist))
    return pairs

  two_stage = check_stages('config.eval.two_stage', config.eval.two_stage)
  if len(set(two_stage)) < len(two_stage):  # Equal entries would share one name, one row of the results.
    raise errors.InputError(f'config.eval.two_stage={tuple(two_stage)} repeats an entry.')
  funnel = check_stages('config.eval.funnel', config.eval.funnel)
  dims, shortlists = [d for d, _ in funnel], [k for _, k in funnel]
  if any(b <= a for a, b in zip(dims, dims[1:])):
    raise errors.InputError(f'config.eval.funnel dims {dims} must strictly increase.')
  if any(b > a for a, b in zip(shortlists, shortlists[1:])):
    raise errors.InputError(f'config.eval.funnel shortlists {shortlists} must not grow.')
  if not config.eval.ks or any(int(k) <= 0 for k in config.eval.ks):
    raise errors.InputError(f'config.eval.ks={tuple(config.eval.ks)} must be one or more positive integers.')


def modes_from_config(config, two_stage_backend: Optional[str] = None) -> list[retrieval.RetrievalMode]:
  """Exact search at every nested dim, then the coarse-to-fine modes that config.eval asks for.

  `two_stage_backend`: how the config.eval.two_stage modes run ('auto', 'rerank' or 'truncate', see
  `coarse_to_fine.TwoStageSearch`); None: config.eval.two_stage_backend ('auto' modes are named
  two_stage_dim{d}_k{k}; a fixed backend adds a _rerank / _truncate suffix). ScaNN builds as
  config.eval.scann says. The config is checked first (`validate_config`).
  """
  validate_config(config, two_stage_backend)
  backend = two_stage_backend or config.eval.two_stage_backend
  settings = retrieval.ScannSettings.from_config(config.eval.scann)
  modes: list[retrieval.RetrievalMode] = [retrieval.ExactSearch(d) for d in config.model.nested_dims]
  for coarse_dim, shortlist in config.eval.two_stage:
    modes.append(coarse_to_fine.TwoStageSearch(coarse_dim, shortlist, settings, backend=backend))
  if config.eval.funnel:
    modes.append(coarse_to_fine.FunnelSearch(tuple(tuple(s) for s in config.eval.funnel), settings=settings))
  return modes


def speed_metrics(queries: np.ndarray, index: retrieval.Index, exact_top: np.ndarray, k: int = 10,
                  latency_queries: int = 100) -> dict[str, float]:
  """How fast a built `index` serves queries [Q, D], as a deployment would.

  Returns 'p50_ms' and 'p99_ms' (the first `latency_queries` queries one at a time) and 'queries_per_s'
  (all of them in one call) for the top-k; coarse-to-fine indexes add 'shortlist_recall' (the fraction of
  `exact_top` [Q, n], the exact full-dim top-n, inside the stage-1 shortlist) and, where stage 1 is its
  own call (not in ScaNN's truncate mode, which runs both stages in one), 'stage1_p50_ms'.
  """

  def latencies(search) -> np.ndarray:
    search(queries[:1])  # Warm-up.
    times = []
    for i in range(min(latency_queries, len(queries))):
      start = time.perf_counter()
      search(queries[i:i + 1])
      times.append(time.perf_counter() - start)
    return 1e3 * np.asarray(times)

  total = latencies(lambda q: index.search(q, k))
  start = time.perf_counter()
  index.search(queries, k)
  out = {'p50_ms': float(np.percentile(total, 50)), 'p99_ms': float(np.percentile(total, 99)),
         'queries_per_s': len(queries) / (time.perf_counter() - start)}
  if hasattr(index, 'shortlist_indices'):
    out['shortlist_recall'] = retrieval.shortlist_recall(index.shortlist_indices(queries), exact_top)
    if isinstance(index, coarse_to_fine.CoarseToFineIndex):
      out['stage1_p50_ms'] = float(np.percentile(latencies(index.shortlist_indices), 50))
  return out


def evaluate(image_embeddings: np.ndarray, text_embeddings: np.ndarray, text_image_ids: np.ndarray,
             modes: Sequence[retrieval.RetrievalMode], ks: Sequence[int], latency_queries: int = 0,
             step: Optional[int] = None, shard: Optional[gallery_shards.Shard] = None,
             directions: Sequence[str] = IMAGE_DIRECTIONS, target_recall: float = 0.0
             ) -> dict[str, dict[str, float]]:
  """Recall of every mode; with `latency_queries` > 0 also its speed both ways (see `speed_metrics`), as
  't2i_*' (caption queries over the images) and 'i2t_*' (image queries over the captions), or as named by
  `directions` (VIDEO_DIRECTIONS: 'v2t_*', 't2v_*').

  Each mode indexes each direction's gallery once, for its recall and its speed. Non-finite embeddings
  raise ValueError naming `step`, the checkpoint step they come from (`check_finite`). With `shard`
  (a multi-process job: every process calls this with all embeddings) each process indexes its share of
  each gallery and the rankings are merged (`gallery_shards`); speed is then not measured (a query would
  time the collective, not a deployment). With `target_recall` > 0 each coarse-to-fine mode's index is tuned
  per direction (`tuned_index`; with `shard`, each share's) and the point is reported as '{direction}_tuned_*'.
  """
  check_finite({'image': image_embeddings, 'text': text_embeddings}, step)
  directions = _directions(image_embeddings, text_embeddings, text_image_ids, directions)
  k = max(ks)
  exact_tops = {}  # The exact full-dim top-k of each query, for shortlist recall.
  results = {}
  if shard is not None and latency_queries:
    logging.info('Galleries sharded over %d processes: retrieval speed is not measured.', shard.count)
    latency_queries = 0
  for mode in modes:
    indexes, rankings, tuned = _rank_directions(mode, directions, k, shard, target_recall)
    results[mode.name] = _rank_metrics(rankings, ks)
    for name, point in tuned.items():
      results[mode.name].update({f'{name}_tuned_{knob}': value for knob, value in point.setting.items()})
      results[mode.name][f'{name}_tuned_recall_at_10'] = point.recall_at_10
    for name, queries, gallery, _ in directions:
      top = min(k, len(gallery))
      if isinstance(mode, retrieval.ExactSearch) and mode.dim == gallery.shape[1]:
        exact_tops[name] = rankings[name].ids[:, :top]  # Already ranked: no second exact search.
      if latency_queries:
        if name not in exact_tops:
          exact_tops[name] = retrieval.ExactIndex(gallery).search(queries, top)[1]
        speed = speed_metrics(queries, indexes[name], exact_tops[name], k, latency_queries)
        results[mode.name].update({f'{name}_{key}': value for key, value in speed.items()})
  return results


RECALL_UNIT = 'percent'  # Of every '{direction}_r{k}', 'rsum' (their sum) and 'mean_recall' (their mean).


def write_metrics_json(path: files.PathLike, results: Mapping, step: Optional[int] = None) -> None:
  """{'step': step (when given), 'recall_unit': 'percent', mode: metrics, ...} at `path`."""
  files.write_json(path, {**({'step': step} if step is not None else {}), 'recall_unit': RECALL_UNIT, **results})


def read_metrics_json(path: files.PathLike) -> dict[str, dict[str, float]]:
  """{mode: metrics} of `write_metrics_json`, recall in percent: a file written before recall was in percent
  (no 'recall_unit'; R@K as fractions, RSUM already a percent sum) has its R@K scaled."""
  recorded = files.read_json(path)
  scale = 1.0 if recorded.get('recall_unit') == RECALL_UNIT else 100.0
  return {mode: {key: value * scale if re.fullmatch(r'\w+_r\d+', key) else value for key, value in metrics.items()}
          for mode, metrics in recorded.items() if isinstance(metrics, dict)}


def format_table(results: Mapping[str, Mapping[str, float]], ks: Sequence[int]) -> str:
  """Recall per mode (percent); then, when measured, text-to-image speed (p50 ms, queries/s, and the shortlist's
  recall of the exact top 10, a fraction)."""
  first = next(iter(results.values()), {})
  to_visual, to_text = next((names for names in (IMAGE_DIRECTIONS, VIDEO_DIRECTIONS)
                             if f'{names[1]}_r{ks[0]}' in first), IMAGE_DIRECTIONS)
  columns = [f'{to_visual}_r{k}' for k in ks] + [f'{to_text}_r{k}' for k in ks] + ['rsum']
  width = max(len(name) for name in list(results) + ['mode']) + 2
  lines = [f'{"mode":<{width}}' + ''.join(f'{c:>9}' for c in columns)]
  for name, metrics in results.items():
    lines.append(f'{name:<{width}}' + ''.join(
        f'{metrics[c]:>9.1f}' for c in columns))
  speed = {name: m for name, m in results.items() if f'{to_text}_p50_ms' in m}
  if speed:
    title = 'text-to-video speed' if to_text == VIDEO_DIRECTIONS[1] else 'text-to-image speed'
    lines.append(f'{title:<{width}}{"p50_ms":>9}{"p99_ms":>9}{"q/s":>9}{"shortlist":>10}')
    for name, m in speed.items():
      recall = m.get(f'{to_text}_shortlist_recall')
      recall = f'{recall:>10.3f}' if recall is not None else f'{"-":>10}'
      lines.append(f'{name:<{width}}{m[f"{to_text}_p50_ms"]:>9.3f}{m[f"{to_text}_p99_ms"]:>9.3f}'
                   f'{m[f"{to_text}_queries_per_s"]:>9.0f}{recall}')
  return '\n'.join(lines)
