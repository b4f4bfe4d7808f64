"""Evaluators chosen by the config, separate from training (big_vision style): each has `run(params) -> metrics`.

The trainer builds them (checking their split with `pipeline.check_split`) before training starts, so a
missing or malformed evaluation split fails at start-up rather than after hours of training, and runs them on
the final parameters (on the run's own evaluation set). The data is loaded only then, so it does not sit in
memory during training. `evaluate_workdir` runs them on a trained workdir's checkpoint, without training, on
every set of config.eval.datasets.
"""

import functools
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import flax
import jax
import ml_collections

from hivlp_jax import checkpointing
from hivlp_jax import errors
from hivlp_jax import evaluate
from hivlp_jax import files
from hivlp_jax import gallery_shards
from hivlp_jax import train_step
from hivlp_jax.data import eval_sets
from hivlp_jax.data import pipeline
from hivlp_jax.models import two_towers

METRICS_FILE = 'metrics.json'  # The training run's final evaluation.
METRICS_DIR = 'metrics'  # Evaluations of a checkpoint without training: <dataset>/<split>/step_<N>.json.


def make_pmapped_embedders(model: two_towers.TwoTowers):
  """(params [devices, ...], images uint8 [devices, b, H, W, 3]) -> [devices, b, D]; the same for tokens."""
  embed_images = jax.pmap(lambda params, x: model.apply({'params': params}, x, method=model.embed_images))
  embed_texts = jax.pmap(lambda params, x: model.apply({'params': params}, x, method=model.embed_texts))
  return embed_images, embed_texts


class RetrievalEvaluator:
  """Image-text retrieval on one split of one evaluation set: recall (and speed) of every mode of config.eval.

  `dataset`: a name of `eval_sets.NAMES` ('': the run's own set); it is read as `eval_sets.dataset_config`
  says, and its split is checked here (a missing file raises errors.MissingInputError naming where the set
  is configured)."""

  def __init__(self, config: ml_collections.ConfigDict, split: str, tokenizer, dataset: str = ''):
    self.name = dataset or eval_sets.own_name(config)
    self.split, self.tokenizer, self.run_config = split, tokenizer, config
    with eval_sets.naming(config, self.name):
      self.config = eval_sets.dataset_config(config, self.name)
      pipeline.check_split(self.config, split, tokenizer)

  def run(self, model: two_towers.TwoTowers, params_replicated, step: int) -> dict[str, dict[str, float]]:
    """{mode name: metrics} for the replicated parameters of `step`.

    In a multi-process job each process embeds its share of the images and captions, the embeddings are
    all-gathered (every process needs every query), and each process indexes its share of each gallery
    (`gallery_shards`): the split's embedding and indexing work is divided, not repeated."""
    with eval_sets.naming(self.run_config, self.name):  # E.g. an unreadable image of another set.
      data = pipeline.load_split(self.config, self.split, self.tokenizer)
    shard = gallery_shards.for_this_process() if jax.process_count() > 1 else None
    embed_images, embed_texts = make_pmapped_embedders(model)
    image_emb, text_emb, text_image_ids = evaluate.embed_split(
        functools.partial(embed_images, params_replicated), functools.partial(embed_texts, params_replicated),
        data, self.config.eval.batch_size, shard)
    clips = data.images.ndim == 5
    return evaluate.evaluate(image_emb, text_emb, text_image_ids, evaluate.modes_from_config(self.config),
                             self.config.eval.ks, self.config.eval.latency_queries, step=step, shard=shard,
                             directions=evaluate.VIDEO_DIRECTIONS if clips else evaluate.IMAGE_DIRECTIONS,
                             target_recall=self.config.eval.scann.target_recall)


def from_config(config: ml_collections.ConfigDict, tokenizer, datasets: Sequence[str] = ()
                ) -> list[RetrievalEvaluator]:
  """An evaluator of config.eval.split per evaluation set of `datasets` (default: the run's own set, which
  training evaluates), their splits checked (a bad one fails here, naming it)."""
  return [RetrievalEvaluator(config, config.eval.split, tokenizer, name)
          for name in datasets or (eval_sets.own_name(config),)]


def run_all(evaluator_list, model, params_replicated, step: int) -> dict[str, dict[str, float]]:
  """Runs every evaluator; the results of all of them in one {mode: metrics} dict."""
  results = {}
  for evaluator in evaluator_list:
    logging.info('Evaluating on the %s split of %s.', evaluator.split, evaluator.name)
    results.update(evaluator.run(model, params_replicated, step))
  return results


def write_results(workdir: str, results: Mapping[str, Mapping[str, float]], step: int,
                  config: ml_collections.ConfigDict, path: Optional[files.PathLike] = None, on: str = '') -> None:
  """`path` (default WORKDIR/metrics.json; written by process 0) and the recall table in the log, titled
  with `on` (the evaluation set) when given."""
  if jax.process_index() == 0:
    evaluate.write_metrics_json(path or files.path(workdir) / METRICS_FILE, results, step)
  logging.info('Results at step %d%s:\n%s', step, f' on {on}' if on else '',
               evaluate.format_table(results, config.eval.ks))


def metrics_path(workdir: str, dataset: str, split: str, step: int) -> files.Path:
  """WORKDIR/metrics/<dataset>/<split>/step_<N>.json: one file per evaluation set, split and checkpoint, so
  evaluating another step or set never overwrites a result (nor the training run's WORKDIR/metrics.json)."""
  return files.path(workdir) / METRICS_DIR / dataset / split / f'step_{step}.json'


def restore_params(workdir: str, config: ml_collections.ConfigDict, model: two_towers.TwoTowers,
                   step: Optional[int] = None) -> tuple[Any, int]:
  """(host parameters, step) of checkpoint `step` in WORKDIR/checkpoints (None: the newest that restores).

  The restore target is the parameters' shapes, traced from a fresh init that loads no pretrained
  weights (a run started from a pretrained tower has the same shapes), so it costs no init. Raises
  errors.MissingInputError when there is no checkpoint, errors.InputError when `step` is not one.
  """
  abstract = jax.eval_shape(functools.partial(train_step.init_params, config, model), jax.random.key(config.seed))
  params, step = checkpointing.restore_params(workdir, abstract, step)
  return params, int(step)


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str, step: Optional[int] = None
                     ) -> dict[str, dict[str, dict[str, float]]]:
  """Evaluates a trained workdir's checkpoint on every set of config.eval.datasets, without training.

  Checks every set's split first, then restores only the parameters of checkpoint `step` (None: the newest
  that restores; not the optimizer, EMA or queues: `checkpointing.restore_params`), runs every retrieval
  mode of config.eval on each set (`eval_sets.names`: () is the run's own set) and writes each set's
  {mode: metrics} with the step to `metrics_path` (WORKDIR/metrics/<dataset>/<split>/step_<N>.json), in
  the layout of the training run's metrics.json. `config` is the run's (its model must be the
  checkpoint's); only eval fields should differ.

  Returns {dataset: {mode: metrics}}. Raises errors.MissingInputError when the workdir, its checkpoints,
  the run's vocabulary or a set's files are missing, errors.InputError naming the field for an unknown
  or empty set name, or naming `step` when the workdir holds no such checkpoint.
  """
  if not files.path(workdir).exists():
    raise errors.MissingInputError(f'--workdir={workdir} does not exist: nothing to evaluate.')
  datasets = eval_sets.names(config)
  tokenizer = pipeline.trained_run_tokenizer(config, workdir)
  evaluator_list = from_config(config, tokenizer, datasets)  # Checks the splits before the (slower) restore.
  model = train_step.create_model(config, tokenizer.vocab_size)
  params, step = restore_params(workdir, config, model, step)
  params_replicated = flax.jax_utils.replicate(params)
  results = {}
  for evaluator in evaluator_list:
    logging.info('Evaluating checkpoint step %d of %s on the %s split of %s.', step, workdir, evaluator.split,
                 evaluator.name)
    results[evaluator.name] = evaluator.run(model, params_replicated, step)
    write_results(workdir, results[evaluator.name], step, config,
                  metrics_path(workdir, evaluator.name, evaluator.split, step), on=evaluator.name)
  return results
