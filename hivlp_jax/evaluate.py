"""Retrieval evaluation: embed a split, score it with retrieval modes, compute recall.

Protocol (Flickr30K/COCO): image-to-text is a hit when any of the image's captions is in the top K;
text-to-image when the caption's one image is. RSUM is the sum of R@1/5/10 both ways.
"""

import json
import os
import time
from typing import Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from hivlp_jax import retrieval
from hivlp_jax.data import pipeline


def best_positive_ranks(similarity: np.ndarray, positives: np.ndarray) -> np.ndarray:
  """0-based rank of each query's best-scoring positive; ties count against the query.

  Args:
    similarity: [Q, G] scores (-inf for items a mode did not retrieve).
    positives: bool [Q, G], True where the gallery item is a correct answer.
  Returns:
    int [Q]: the number of negatives scoring at least as high as the best positive. A query whose
    positives all score -inf gets rank G (never a hit).
  """
  best = np.max(np.where(positives, similarity, -np.inf), axis=1, keepdims=True)
  ranks = np.sum((similarity >= best) & ~positives, axis=1)
  return np.where(np.isneginf(best[:, 0]), similarity.shape[1], ranks)


def recall_at_k(similarity: np.ndarray, positives: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
  ranks = best_positive_ranks(similarity, positives)
  return {k: float(np.mean(ranks < k)) for k in ks}


def retrieval_metrics(image_embeddings: np.ndarray, text_embeddings: np.ndarray, text_image_ids: np.ndarray,
                      mode: retrieval.RetrievalMode, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """Recall both ways for one retrieval mode.

  Args:
    image_embeddings: [N, D]; text_embeddings: [T, D]; text_image_ids: int [T], the image of each caption.
  Returns:
    'i2t_r{k}', 't2i_r{k}' for each k, 'rsum' and 'mean_recall'.
  """
  positives_t2i = text_image_ids[:, None] == np.arange(image_embeddings.shape[0])[None, :]  # [T, N]
  i2t = recall_at_k(mode.similarity(image_embeddings, text_embeddings), positives_t2i.T, ks)
  t2i = recall_at_k(mode.similarity(text_embeddings, image_embeddings), positives_t2i, ks)
  metrics = {f'i2t_r{k}': v for k, v in i2t.items()} | {f't2i_r{k}': v for k, v in t2i.items()}
  metrics['rsum'] = 100.0 * sum(metrics.values())
  metrics['mean_recall'] = metrics['rsum'] / (2 * len(ks))
  return metrics


def embed_split(embed_images: Callable, embed_texts: Callable, data: pipeline.ImageTextSplit, batch_size: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Embeds every image and caption of a split with pmapped embedding functions.

  `embed_images(images [devices, b, H, W, 3])` and `embed_texts(tokens [devices, b, L])` return
  [devices, b, D]. Returns image embeddings [N, D], text embeddings [N * captions, D] and the image
  id of each caption [N * captions].
  """
  tokens = data.tokens.reshape(-1, data.tokens.shape[-1])
  text_image_ids = np.repeat(np.arange(data.num_images), data.captions_per_image)
  return (embed_batches(embed_images, data.images, batch_size), embed_batches(embed_texts, tokens, batch_size),
          text_image_ids)


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


def modes_from_config(config, two_stage_backend: Optional[str] = None) -> list[retrieval.RetrievalMode]:
  """Exact search at every nested dim, then the coarse-to-fine modes that config.eval asks for.

  `two_stage_backend`: how the config.eval.two_stage modes run ('auto', 'rerank' or 'truncate', see
  `retrieval.TwoStageSearch`); None: config.eval.two_stage_backend ('auto' modes are named
  two_stage_dim{d}_k{k}; a fixed backend adds a _rerank / _truncate suffix). ScaNN builds as
  config.eval.scann says.
  """
  backend = two_stage_backend or config.eval.two_stage_backend
  settings = retrieval.ScannSettings.from_config(config.eval.scann)
  modes: list[retrieval.RetrievalMode] = [retrieval.ExactSearch(d) for d in config.model.nested_dims]
  for coarse_dim, shortlist in config.eval.two_stage:
    modes.append(retrieval.TwoStageSearch(coarse_dim, shortlist, settings, backend=backend))
  if config.eval.funnel:
    modes.append(retrieval.FunnelSearch(tuple(tuple(s) for s in config.eval.funnel), settings=settings))
  return modes


def speed_metrics(queries: np.ndarray, gallery: np.ndarray, mode: retrieval.RetrievalMode,
                  exact_top: np.ndarray, k: int = 10, latency_queries: int = 100) -> dict[str, float]:
  """How fast `mode` serves queries [Q, D] over gallery [G, D], as a deployment would (index built once).

  Returns 'p50_ms' and 'p99_ms' (the first `latency_queries` queries one at a time) and 'queries_per_s'
  (all of them in one call) for the top-k; coarse-to-fine modes add 'shortlist_recall' (the fraction of
  `exact_top` [Q, n], the exact full-dim top-n, inside the stage-1 shortlist) and, where stage 1 is its
  own call (not in ScaNN's truncate mode, which runs both stages in one), 'stage1_p50_ms'.
  """
  index = mode.index(gallery)  # Built (and cached) before the clock starts.

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
    if isinstance(index, retrieval.CoarseToFineIndex):
      out['stage1_p50_ms'] = float(np.percentile(latencies(index.shortlist_indices), 50))
  return out


def evaluate(image_embeddings: np.ndarray, text_embeddings: np.ndarray, text_image_ids: np.ndarray,
             modes: Sequence[retrieval.RetrievalMode], ks: Sequence[int], latency_queries: int = 0
             ) -> dict[str, dict[str, float]]:
  """Recall of every mode; with `latency_queries` > 0 also its speed both ways (see `speed_metrics`), as
  't2i_*' (caption queries over the images) and 'i2t_*' (image queries over the captions)."""
  results = {mode.name: retrieval_metrics(image_embeddings, text_embeddings, text_image_ids, mode, ks)
             for mode in modes}
  if latency_queries:
    for direction, queries, gallery in (('t2i', text_embeddings, image_embeddings),
                                        ('i2t', image_embeddings, text_embeddings)):
      exact_top = retrieval.exact_top_k(queries, gallery, max(ks))[1]
      for mode in modes:
        speed = speed_metrics(queries, gallery, mode, exact_top, max(ks), latency_queries)
        results[mode.name].update({f'{direction}_{key}': value for key, value in speed.items()})
  return results


def write_metrics_json(path: str, results: Mapping, step: int) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump({'step': step, **results}, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def format_table(results: Mapping[str, Mapping[str, float]], ks: Sequence[int]) -> str:
  """Recall per mode; then, when measured, text-to-image speed (p50 ms, queries/s, shortlist recall)."""
  columns = [f'i2t_r{k}' for k in ks] + [f't2i_r{k}' for k in ks] + ['rsum']
  width = max(len(name) for name in list(results) + ['mode']) + 2
  lines = [f'{"mode":<{width}}' + ''.join(f'{c:>9}' for c in columns)]
  for name, metrics in results.items():
    lines.append(f'{name:<{width}}' + ''.join(
        f'{metrics[c]:>9.1f}' if c == 'rsum' else f'{metrics[c]:>9.3f}' for c in columns))
  speed = {name: m for name, m in results.items() if 't2i_p50_ms' in m}
  if speed:
    lines.append(f'{"text-to-image speed":<{width}}{"p50_ms":>9}{"p99_ms":>9}{"q/s":>9}{"shortlist":>10}')
    for name, m in speed.items():
      recall = f'{m["t2i_shortlist_recall"]:>10.3f}' if 't2i_shortlist_recall' in m else f'{"-":>10}'
      lines.append(f'{name:<{width}}{m["t2i_p50_ms"]:>9.3f}{m["t2i_p99_ms"]:>9.3f}{m["t2i_queries_per_s"]:>9.0f}'
                   + recall)
  return '\n'.join(lines)
