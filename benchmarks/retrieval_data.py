"""The galleries and queries of benchmarks/retrieval.py: synthetic, or a trained run's embeddings and noisy
copies of them (see that script's docstring)."""

from absl import logging
import numpy as np


def synthetic_data(num_items: int, dim: int, num_queries: int, noise: float, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Gallery [G, dim] with variance 1 / (1 + i / 16)^2 on coordinate i; queries [Q, dim], noisy copies."""
  rng = np.random.default_rng(seed)
  std = (1.0 / (1.0 + np.arange(dim) / 16.0)).astype(np.float32)
  gallery = np.empty((num_items, dim), np.float32)
  for start in range(0, num_items, 65536):  # In chunks: no float64 temporaries at 1M x 768.
    block = rng.standard_normal((min(65536, num_items - start), dim), np.float32)
    gallery[start:start + len(block)] = block * std
  sources = rng.choice(num_items, num_queries, replace=False)
  queries = gallery[sources] + noise * rng.standard_normal((num_queries, dim), np.float32) * std
  return gallery, queries


def clustered_data(num_items: int, dim: int, num_queries: int, noise: float, seed: int, num_clusters: int,
                   spread: float) -> tuple[np.ndarray, np.ndarray]:
  """A Gaussian mixture gallery [G, dim] and noisy copies of its items as queries [Q, dim].

  Centres are drawn like `synthetic_data`'s items (std 1 / (1 + i / 16) on coordinate i); an item is a
  centre (uniformly chosen) plus Gaussian noise of `spread` times that std; a query is an item plus noise
  of `noise * spread` times it, so a query's neighbours are mostly items of its own cluster.
  """
  rng = np.random.default_rng(seed)
  std = (1.0 / (1.0 + np.arange(dim) / 16.0)).astype(np.float32)
  centres = rng.standard_normal((num_clusters, dim), np.float32) * std
  gallery = np.empty((num_items, dim), np.float32)
  for start in range(0, num_items, 65536):
    count = min(65536, num_items - start)
    members = rng.integers(0, num_clusters, count)
    gallery[start:start + count] = centres[members] + spread * rng.standard_normal((count, dim), np.float32) * std
  sources = rng.choice(num_items, num_queries, replace=False)
  queries = gallery[sources] + noise * spread * rng.standard_normal((num_queries, dim), np.float32) * std
  return gallery, queries


def trained_embeddings(workdir: str, config_file: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Image [N, D] and caption [N * captions, D] embeddings of `split` by the latest checkpoint of `workdir`."""
  from hivlp_jax import config_lib
  from hivlp_jax import evaluate
  from hivlp_jax import gallery as gallery_lib
  from hivlp_jax.data import pipeline
  run = gallery_lib.load_run(workdir, config_lib.load_config_file(config_file) if config_file else None)
  data = pipeline.load_split(run.config, split, run.tokenizer)
  images, texts, _ = evaluate.embed_split(*run.embedders(), data, run.config.eval.batch_size)
  logging.info('Embedded %d images and %d captions of %s (step %d, dim %d).', len(images), len(texts), split,
               run.step, images.shape[1])
  return images, texts


def replicated_data(images: np.ndarray, texts: np.ndarray, num_items: int, num_queries: int, noise: float,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Gallery [G, D]: the N `images`, then noisy copies (item i copies image i mod N); queries [Q, D], `texts`.

  A copy adds Gaussian noise of std `noise` times each coordinate's std over the N images. Queries are
  sampled without replacement (with, when Q exceeds the captions).
  """
  rng = np.random.default_rng(seed)
  images = images.astype(np.float32)
  std = images.std(axis=0)
  gallery = np.empty((num_items, images.shape[1]), np.float32)
  for start in range(0, num_items, 65536):
    rows = np.arange(start, min(num_items, start + 65536))
    block = images[rows % len(images)]
    copies = rows >= len(images)  # The first N rows are the real embeddings.
    block[copies] += noise * rng.standard_normal((int(copies.sum()), images.shape[1]), np.float32) * std
    gallery[rows] = block
  picks = rng.choice(len(texts), num_queries, replace=num_queries > len(texts))
  return gallery, texts[picks].astype(np.float32)
