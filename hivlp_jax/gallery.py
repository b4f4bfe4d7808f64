"""A trained run's galleries and their saved two-stage indexes: what the query tool searches.

`load_run` restores the parameters of a run's latest checkpoint (only the parameters: not the optimizer,
the momentum towers or the queues), `split_galleries` / `folder_gallery` give what a query searches,
`gallery_index` serves a gallery from WORKDIR/indexes/<key>-dim<coarse_dim>/ (`index_store`) while the
checkpoint step, the parameters, the gallery's inputs and the backend are unchanged, and `search` runs
one query. Rendering and the command line are in `query`.
"""

import ast
import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Optional

from absl import logging
import flax
import jax
import ml_collections
import numpy as np
from PIL import Image

from hivlp_jax import checkpointing
from hivlp_jax import config_lib
from hivlp_jax import errors
from hivlp_jax import evaluate
from hivlp_jax import evaluators
from hivlp_jax import files
from hivlp_jax import index_store
from hivlp_jax import retrieval
from hivlp_jax import sharded_index
from hivlp_jax import train_step
from hivlp_jax import tuning
from hivlp_jax.data import pipeline
from hivlp_jax.data import tokenizer as tokenizer_lib
from hivlp_jax.models import two_towers

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                              'default.py')
INDEX_DIR = 'indexes'
TUNING_QUERIES = 1000  # Held-out queries an index is tuned on (`tuned`).
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp')
# Config fields that must match the run's: they decide the parameters' shapes and the token ids.
MODEL_FIELDS = ('model.', 'data.name', 'data.builder_config', 'data.vocab_file', 'data.vocab_size')
# What PIL raises on a file that is not a readable image (UnidentifiedImageError is an OSError).
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


# ----------------------------------------------------------------------------------------------------
# The run: config, tokenizer, parameters of the latest checkpoint.


def _read_recorded_config(workdir: str) -> dict:
  path = files.path(workdir) / config_lib.CONFIG_FILE
  if not path.exists():
    raise errors.MissingInputError(f'{path} does not exist: is {workdir!r} a training workdir? Pass --config=FILE '
                                   'to give the run\'s config explicitly.')
  return checkpointing.read_config_record(path)


def config_from_workdir(workdir: str, base: Optional[ml_collections.ConfigDict] = None
                        ) -> ml_collections.ConfigDict:
  """The config a run recorded in WORKDIR/config.json, rebuilt over `base` (default configs/default.py).

  config.json is `config_lib.flatten(config)`: sequences were written as strings (`str(tuple(...))`), so a
  field whose value in `base` is a tuple is parsed back with `ast.literal_eval`. A recorded field that
  `base` lacks (a run of another config file, e.g. configs/flickr30k.py's data fields) is added as
  recorded, a '(...)' string parsed back to a tuple, and logged.
  """
  flat = _read_recorded_config(workdir)
  config = base if base is not None else config_lib.load_config_file(DEFAULT_CONFIG)
  config = ml_collections.ConfigDict(config.to_dict())  # Unlocked copy.
  added = []
  for name, value in flat.items():
    *parents, key = name.split('.')
    node = config
    for parent in parents:
      if parent not in node:
        node[parent] = ml_collections.ConfigDict()
      node = node[parent]
    if key not in node:
      added.append(name)
      if isinstance(value, str) and value.startswith('(') and value.endswith(')'):
        try:
          value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
          pass
    elif isinstance(node[key], (tuple, list)) and isinstance(value, str):
      value = ast.literal_eval(value)
    node[key] = value
  if added:
    logging.info('%s records fields that %s lacks, taken as recorded: %s',
                 files.path(workdir) / config_lib.CONFIG_FILE, DEFAULT_CONFIG,
                 ', '.join(added[:10]) + (' ...' if len(added) > 10 else ''))
  return config


def load_config(workdir: str, config: Optional[ml_collections.ConfigDict] = None
                ) -> ml_collections.ConfigDict:
  """`config` checked against the one WORKDIR/config.json recorded, or that one when `config` is None."""
  if config is None:
    return config_from_workdir(workdir)
  if (files.path(workdir) / config_lib.CONFIG_FILE).exists():
    recorded = _read_recorded_config(workdir)
    current = json.loads(json.dumps(config_lib.flatten(config)))  # As config.json holds it.
    bad = [k for k in sorted(set(recorded) | set(current))
           if k.startswith(MODEL_FIELDS) and recorded.get(k) != current.get(k)]
    if bad:
      details = '; '.join(f'{k}: {recorded.get(k)!r} in the run, {current.get(k)!r} given' for k in bad[:5])
      raise errors.InputError(f'The config does not match the run in {workdir!r} ({details}). Leave out --config '
                              'to use the run\'s own.')
  return config


def params_fingerprint(params) -> str:
  """sha1 over every parameter's path, dtype, shape and bytes."""
  digest = hashlib.sha1()
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    digest.update(f'{jax.tree_util.keystr(path)}:{index_store.fingerprint(np.asarray(leaf))};'.encode())
  return digest.hexdigest()


@dataclasses.dataclass
class Run:
  """A trained run, restored: what it takes to embed queries and galleries."""
  workdir: str
  config: ml_collections.ConfigDict
  tokenizer: tokenizer_lib.Tokenizer
  model: two_towers.TwoTowers
  step: int
  params: Any  # Replicated over the local devices.
  params_fingerprint: str

  def __post_init__(self):
    self._embed_images, self._embed_texts = evaluators.make_pmapped_embedders(self.model)

  def embedders(self):
    """(embed_images, embed_texts) as `evaluate.embed_split` takes them."""
    return (functools.partial(self._embed_images, self.params),
            functools.partial(self._embed_texts, self.params))

  def embed(self, side: str, inputs: np.ndarray, batch_size: Optional[int] = None) -> np.ndarray:
    """Images uint8 [N, S, S, 3] (side 'image') or tokens int32 [N, L] (side 'text') -> float32 [N, D]."""
    embed = self.embedders()[0 if side == 'image' else 1]
    return evaluate.embed_batches(embed, inputs, batch_size or self.config.eval.batch_size)


def load_run(workdir: str, config: Optional[ml_collections.ConfigDict] = None) -> Run:
  """Restores the parameters of the latest checkpoint of the run in `workdir` (config: see `load_config`)."""
  config = load_config(workdir, config)
  tokenizer = pipeline.trained_run_tokenizer(config, workdir)
  model = train_step.create_model(config, tokenizer.vocab_size)
  params, step = evaluators.restore_params(workdir, config, model)
  return Run(workdir=workdir, config=config, tokenizer=tokenizer, model=model, step=step,
             params=flax.jax_utils.replicate(params), params_fingerprint=params_fingerprint(params))


# ----------------------------------------------------------------------------------------------------
# Galleries and their saved indexes.


@dataclasses.dataclass
class Gallery:
  """What a query searches.

  key: the index directory's name stem ('test', 'test-captions', 'dir-photos-1a2b3c4d').
  side: 'image' or 'text', the tower that embeds `inputs`.
  inputs: uint8 [G, S, S, 3] images or int32 [G, L] tokens.
  labels: G str to print per item (a caption, or a file name).
  images: uint8 [N, H, W, 3] to show; image_ids: int [G], the row of `images` that shows each item.
  skipped: the files of a folder that could not be read as images (not in the gallery).
  """
  name: str
  key: str
  side: str
  inputs: np.ndarray
  labels: list[str]
  images: np.ndarray
  image_ids: np.ndarray
  skipped: list[str] = dataclasses.field(default_factory=list)

  @property
  def size(self) -> int:
    return self.inputs.shape[0]


def split_galleries(run: Run, split: str) -> tuple[Gallery, Gallery]:
  """The images (labelled with their first caption) and the captions of a split of the run's data set."""
  pipeline.check_split(run.config, split, run.tokenizer)  # An unknown split or missing file, named.
  data = pipeline.load_split(run.config, split, run.tokenizer)
  images = Gallery(name=f'{split} images', key=split, side='image', inputs=data.images,
                   labels=[c[0] for c in data.captions], images=data.images,
                   image_ids=np.arange(data.num_images))
  captions = Gallery(name=f'{split} captions', key=f'{split}-captions', side='text',
                     inputs=data.tokens.reshape(-1, data.tokens.shape[-1]),
                     labels=[c for row in data.captions for c in row], images=data.images,
                     image_ids=np.repeat(np.arange(data.num_images), data.captions_per_image))
  return images, captions


def load_image(path: files.PathLike, size: int) -> np.ndarray:
  """An image file as the model takes it: RGB uint8 [size, size, 3] (bilinear resize). A file that is
  not a readable image raises errors.InputError naming it."""
  try:
    with files.path(path).open('rb') as f, Image.open(f) as image:
      image = image.convert('RGB')
      if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
      return np.asarray(image, np.uint8)
  except UNREADABLE_IMAGE_ERRORS as e:
    raise errors.InputError(f'{path} is not a readable image ({type(e).__name__}: {e}).') from e


def folder_gallery(directory: str, size: int) -> Gallery:
  """The images of a folder (sorted by name), resized to the model's `size`; unreadable ones are skipped,
  each logged, and listed in `skipped`."""
  folder = files.path(directory)
  if not folder.is_dir():
    raise errors.MissingInputError(f'The image folder {directory} does not exist (or is not a folder).')
  names = sorted(p.name for p in folder.iterdir() if p.name.lower().endswith(IMAGE_EXTENSIONS))
  if not names:
    raise errors.MissingInputError(f'No images ({", ".join(IMAGE_EXTENSIONS)}) in {directory}.')
  images, labels, skipped = [], [], []
  for name in names:
    try:
      images.append(load_image(folder / name, size))
      labels.append(name)
    except errors.InputError as e:
      logging.warning('Skipping %s', e)
      skipped.append(name)
  if skipped:
    logging.warning('Skipped %d unreadable of the %d images in %s.', len(skipped), len(names), directory)
  if not images:
    raise errors.InputError(f'None of the {len(names)} images in {directory} could be read.')
  images = np.stack(images)
  path_hash = hashlib.sha1(str(files.absolute(directory)).encode()).hexdigest()[:8]
  base = folder.name or 'root'
  return Gallery(name=f'images in {directory}', key=f'dir-{base}-{path_hash}', side='image', inputs=images,
                 labels=labels, images=images, image_ids=np.arange(len(labels)), skipped=skipped)


@dataclasses.dataclass
class GalleryIndex:
  index: retrieval.Index  # CoarseToFineIndex ('rerank'), ScannPrefixIndex ('truncate'), or a ShardedIndex of them.
  backend: str  # 'rerank' or 'truncate'.
  directory: str
  rebuilt: bool  # The ScaNN index was built (not loaded).
  embedded: bool  # The gallery was embedded (its saved embeddings were not reused).
  stale_reasons: list[str]
  operating_point: Optional[dict] = None  # The manifest's, when tuned to a recall target (`tuned`).


def gallery_index(run: Run, gallery: Gallery, coarse_dim: int, shortlist: int, backend: str = 'auto',
                  settings: Optional[retrieval.ScannSettings] = None, target_recall: float = 0.0,
                  queries_from: Optional[Gallery] = None, min_shortlist: int = tuning.RECALL_K,
                  num_shards: int = 1) -> GalleryIndex:
  """The two-stage index of `gallery`, from WORKDIR/indexes/<key>-dim<coarse_dim> when still valid (saved
  in `num_shards` shards when more than one, `sharded_index`: another count is stale).

  Saved embeddings are reused when the checkpoint step and the `source` (the gallery's inputs and the
  parameters, by fingerprint) match and their file is intact; the ScaNN index when, in addition, the
  embeddings, settings and resolved backend ('auto': see `coarse_to_fine.TwoStageSearch`) do and its
  files are intact. Non-finite embeddings raise ValueError naming the step. With `target_recall` > 0 the
  index serves at its tuned leaves and shortlist (`tuned`: on queries from `queries_from`, default the
  gallery's own items; the shortlist stays >= `min_shortlist`) instead of the given ones.
  """
  directory = str(files.path(run.workdir) / INDEX_DIR / f'{gallery.key}-dim{coarse_dim}')
  source = {'gallery': gallery.key, 'side': gallery.side, 'inputs': index_store.fingerprint(gallery.inputs),
            'params': run.params_fingerprint}
  embeddings = sharded_index.cached_embeddings(directory, run.step, source)
  embedded = embeddings is None
  if embedded:
    logging.info('Embedding the %d %s.', gallery.size, gallery.name)
    embeddings = run.embed(gallery.side, gallery.inputs)
  evaluate.check_finite({gallery.name: embeddings}, run.step)
  stored = sharded_index.load_or_build(directory, embeddings, run.step, coarse_dim, shortlist, settings,
                                       source=source, backend=backend, num_shards=num_shards)
  index, point = stored.index(), None
  if target_recall and stored.embeddings.shape[0] > tuning.RECALL_K:
    index, point = tuned(run, stored, index, directory, queries_from or gallery, target_recall, min_shortlist)
  return GalleryIndex(index, stored.backend, directory, stored.rebuilt, embedded, stored.stale_reasons, point)


def tuned(run: Run, stored: Any, index: retrieval.Index, directory: str,
          queries_from: Gallery, target_recall: float, min_shortlist: int) -> tuple[retrieval.Index, dict]:
  """`index` at the cheapest leaves and shortlist (>= `min_shortlist`) reaching `target_recall`
  (`tuning.tune_index`).

  Tuned on TUNING_QUERIES items of `queries_from` (a fixed sample, embedded here) against their exact
  full-dim top-10 in the gallery; the point is recorded in the index's manifest and reused while the
  index, the target and the query gallery are unchanged. For a split's image gallery the caller passes
  the split's captions (text-to-image queries, as served); a folder's own images stand in for queries.
  """
  count = min(TUNING_QUERIES, queries_from.size)
  source = {'target_recall': float(target_recall), 'queries': queries_from.key, 'side': queries_from.side,
            'count': count, 'min_shortlist': int(min_shortlist)}
  saved = stored.manifest.get('operating_point')  # A rebuilt index's new manifest has none.
  if saved and saved.get('source') == source:
    return index.with_knobs(**saved['setting']), saved
  sample = np.sort(np.random.default_rng(0).choice(queries_from.size, count, replace=False))
  logging.info('Tuning %s to recall@10 %.3f on %d %s.', directory, target_recall, count, queries_from.name)
  queries = run.embed(queries_from.side, queries_from.inputs[sample])
  evaluate.check_finite({f'tuning queries from {queries_from.name}': queries}, run.step)
  exact = tuning.exact_top_k(stored.embeddings, queries)
  shortlists = [s for s in tuning.SHORTLISTS if s >= min_shortlist] or [min_shortlist]
  index, point = tuning.tune_index(index, queries, exact, target_recall, shortlists)
  record = point.to_json() | {'source': source}
  index_store.record_operating_point(directory, stored.manifest, record)
  return index, record


# ----------------------------------------------------------------------------------------------------
# Queries.


@dataclasses.dataclass
class Hit:
  rank: int  # 1-based.
  index: int  # Into the gallery.
  score: float  # Full-dim cosine.
  label: str


@dataclasses.dataclass
class QueryResult:
  kind: str  # 'text' or 'image'.
  query: str  # The text, or the image's path.
  query_image: Optional[np.ndarray]  # uint8 [S, S, 3] for image queries.
  query_embedding: np.ndarray  # float32 [D].
  gallery: Gallery
  hits: list[Hit]
  step: int
  index: GalleryIndex


def search(run: Run, found: GalleryIndex, gallery: Gallery, kind: str, text_or_path: str, k: int
           ) -> QueryResult:
  """One query (a text, or an image file's path) against `gallery`, indexed as `found`: its top-k hits."""
  if kind == 'text':
    query_image = None
    tokens = run.tokenizer.encode([text_or_path], run.config.model.text.max_len)
    embedding = run.embed('text', tokens, batch_size=1)
  else:
    query_image = load_image(text_or_path, run.config.model.image_size)
    embedding = run.embed('image', query_image[None], batch_size=1)
  evaluate.check_finite({f'{kind} query': embedding}, run.step)
  scores, ids = found.index.search(embedding, k)
  hits = [Hit(rank + 1, int(i), float(s), gallery.labels[int(i)])
          for rank, (s, i) in enumerate(zip(scores[0], ids[0])) if i >= 0]
  return QueryResult(kind, text_or_path, query_image, embedding[0], gallery, hits, run.step, found)
