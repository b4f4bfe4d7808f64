"""Evaluators chosen by the config, separate from training (big_vision style): each has `run(params) -> metrics`.

The trainer builds them (checking their split with `pipeline.check_split`) before training starts, so a
missing or malformed evaluation split fails at start-up rather than after hours of training, and runs them on
the final parameters. The data is loaded only then, so it does not sit in memory during training.
"""

import functools
from typing import Mapping

from absl import logging
import jax
import ml_collections

from hivlp_jax import evaluate
from hivlp_jax import files
from hivlp_jax.data import pipeline
from hivlp_jax.models import two_towers

METRICS_FILE = 'metrics.json'


def make_pmapped_embedders(model: two_towers.TwoTowers):
  """(params [devices, ...], images uint8 [devices, b, H, W, 3]) -> [devices, b, D]; the same for tokens."""
  embed_images = jax.pmap(lambda params, x: model.apply({'params': params}, x, method=model.embed_images))
  embed_texts = jax.pmap(lambda params, x: model.apply({'params': params}, x, method=model.embed_texts))
  return embed_images, embed_texts


class RetrievalEvaluator:
  """Image-text retrieval on one split: recall (and speed) of every retrieval mode of config.eval."""

  def __init__(self, config: ml_collections.ConfigDict, split: str, tokenizer):
    self.config, self.split, self.tokenizer = config, split, tokenizer
    self.name = split
    pipeline.check_split(config, split, tokenizer)

  def run(self, model: two_towers.TwoTowers, params_replicated, step: int) -> dict[str, dict[str, float]]:
    """{mode name: metrics} for the replicated parameters of `step`."""
    data = pipeline.load_split(self.config, self.split, self.tokenizer)
    embed_images, embed_texts = make_pmapped_embedders(model)
    image_emb, text_emb, text_image_ids = evaluate.embed_split(
        functools.partial(embed_images, params_replicated), functools.partial(embed_texts, params_replicated),
        data, self.config.eval.batch_size)
    return evaluate.evaluate(image_emb, text_emb, text_image_ids, evaluate.modes_from_config(self.config),
                             self.config.eval.ks, self.config.eval.latency_queries, step=step)


def from_config(config: ml_collections.ConfigDict, tokenizer) -> list[RetrievalEvaluator]:
  """The evaluators of config.eval, their splits checked (a bad one fails here, naming it)."""
  return [RetrievalEvaluator(config, config.eval.split, tokenizer)]


def run_all(evaluator_list, model, params_replicated, step: int) -> dict[str, dict[str, float]]:
  """Runs every evaluator; the results of all of them in one {mode: metrics} dict."""
  results = {}
  for evaluator in evaluator_list:
    logging.info('Evaluating on the %s split.', evaluator.name)
    results.update(evaluator.run(model, params_replicated, step))
  return results


def write_results(workdir: str, results: Mapping[str, Mapping[str, float]], step: int,
                  config: ml_collections.ConfigDict) -> None:
  """WORKDIR/metrics.json (process 0) and the recall table in the log."""
  if jax.process_index() == 0:
    evaluate.write_metrics_json(files.path(workdir) / METRICS_FILE, results, step)
  logging.info('Results at step %d:\n%s', step, evaluate.format_table(results, config.eval.ks))
