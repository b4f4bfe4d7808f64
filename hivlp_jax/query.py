r"""Queries a trained run: a caption or an image in, the top-k of a gallery out.

  python -m hivlp_jax.query --workdir=runs/default --text="a small red circle in the top left" \
      [--image=scene.png] [--split=test] [--k=5] [--contact_sheet=out.png] [--html=out.html]

--text searches the images of the data set's --split (or of a folder, --image_dir) and prints each hit's
index, score and first caption (its file name for a folder). --image searches the split's captions
(the images of --image_dir with --image_dir). Both may be given; each is its own query.

The config is the run's own by default: the flattened config that training recorded in
WORKDIR/config.json, parsed back over configs/default.py (whose field types tell tuples from strings).
--config=FILE [--config.x=y ...] gives it explicitly instead; it must agree with config.json on the
model and the vocabulary (the checkpoint would not load otherwise).

The latest readable checkpoint is restored (`train.restore_latest`). The gallery's embeddings and a
two-stage index over them (ScaNN over the --coarse_dim prefixes shortlists --shortlist items, exact
full-dim cosine re-ranks them; defaults: config.eval.two_stage[0]) are saved under
WORKDIR/indexes/<gallery>-dim<coarse_dim>/ (`index_store`), where <gallery> is the split (its images),
<split>-captions, or dir-<name>-<hash> for a folder. --backend picks how the two stages run
(`retrieval.TwoStageSearch`): 'rerank' (ScaNN shortlist, re-ranked in numpy), 'truncate' (one ScaNN
searcher in truncate mode) or 'auto' (the default: truncate from ScaNN's brute-force threshold, 20,000
items, up). The next query reuses both when the checkpoint step, the parameters, the gallery's inputs
and the backend are unchanged; otherwise it says why and rebuilds (the embeddings are reused when only
the backend changed).

--contact_sheet writes a PNG with one row per query (the query image first, for image queries) of the
retrieved images upscaled to --tile pixels, each titled with its rank and score (a caption's image for
a caption); --html writes one page with the same images inline (base64 PNG) and the captions.
"""

import base64
import dataclasses
import functools
import hashlib
import html
import io
import json
import os
import sys
from typing import Any, Optional, Sequence, TextIO

from absl import app
from absl import flags
from absl import logging
import flax
import jax
import ml_collections
import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

from hivlp_jax import config_lib
from hivlp_jax import evaluate
from hivlp_jax import index_store
from hivlp_jax import log_filter
from hivlp_jax import retrieval
from hivlp_jax import train
from hivlp_jax.data import pipeline
from hivlp_jax.data import tokenizer as tokenizer_lib
from hivlp_jax.models import two_towers

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                              'default.py')
INDEX_DIR = 'indexes'
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp')
# Config fields that must match the run's: they decide the parameters' shapes and the token ids.
MODEL_FIELDS = ('model.', 'data.name', 'data.builder_config', 'data.vocab_file', 'data.vocab_size')

# Contact sheet layout, in pixels: margin, query line above each row, title line above each tile.
PAD, HEADER_HEIGHT, TITLE_HEIGHT = 4, 16, 14


# ----------------------------------------------------------------------------------------------------
# The run: config, tokenizer, parameters of the latest checkpoint.


def _read_recorded_config(workdir: str) -> dict:
  path = os.path.join(workdir, config_lib.CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: is {workdir!r} a training workdir? Pass --config=FILE '
                            'to give the run\'s config explicitly.')
  with open(path) as f:
    return json.load(f)


def config_from_workdir(workdir: str, base: Optional[ml_collections.ConfigDict] = None
                        ) -> ml_collections.ConfigDict:
  """The config a run recorded in WORKDIR/config.json, rebuilt over `base` (default configs/default.py).

  config.json is `config_lib.flatten(config)`: sequences were written as strings, so a field whose value
  in `base` is a tuple is parsed back with `ast.literal_eval`. A recorded field that `base` lacks is an
  error (pass the run's --config file instead).
  """
  import ast  # pylint: disable=g-import-not-at-top
  flat = _read_recorded_config(workdir)
  config = base if base is not None else config_lib.load_config_file(DEFAULT_CONFIG)
  config = ml_collections.ConfigDict(config.to_dict())  # Unlocked copy.
  unknown = []
  for name, value in flat.items():
    *parents, key = name.split('.')
    node = config
    for parent in parents:
      node = node.get(parent) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or key not in node:
      unknown.append(name)
      continue
    if isinstance(node[key], (tuple, list)) and isinstance(value, str):
      value = ast.literal_eval(value)
    node[key] = value
  if unknown:
    raise ValueError(f'{os.path.join(workdir, config_lib.CONFIG_FILE)} has fields that {DEFAULT_CONFIG} lacks '
                     f'({", ".join(unknown[:5])}): pass the run\'s config file with --config.')
  return config


def load_config(workdir: str, config: Optional[ml_collections.ConfigDict] = None
                ) -> ml_collections.ConfigDict:
  """`config` checked against the one WORKDIR/config.json recorded, or that one when `config` is None."""
  if config is None:
    return config_from_workdir(workdir)
  if os.path.exists(os.path.join(workdir, config_lib.CONFIG_FILE)):
    recorded = _read_recorded_config(workdir)
    current = json.loads(json.dumps(config_lib.flatten(config)))
    bad = [k for k in sorted(set(recorded) | set(current))
           if k.startswith(MODEL_FIELDS) and recorded.get(k) != current.get(k)]
    if bad:
      details = '; '.join(f'{k}: {recorded.get(k)!r} in the run, {current.get(k)!r} given' for k in bad[:5])
      raise ValueError(f'The config does not match the run in {workdir!r} ({details}). Leave out --config '
                       'to use the run\'s own.')
  return config


def abstract_train_state(config: ml_collections.ConfigDict, model: two_towers.TwoTowers):
  """The TrainState's shapes and dtypes on the first local device: a restore target that costs no init."""
  shapes = jax.eval_shape(lambda: train.create_train_state(config, model, jax.random.key(config.seed)))
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def restore_state(workdir: str, config: ml_collections.ConfigDict, model: two_towers.TwoTowers
                  ) -> train.TrainState:
  """The TrainState of the latest readable checkpoint in WORKDIR/checkpoints (FileNotFoundError if none)."""
  directory = os.path.join(workdir, 'checkpoints')
  manager = train.checkpoint_manager(workdir, config) if os.path.isdir(directory) else None
  if manager is None or not manager.all_steps():
    raise FileNotFoundError(f'No checkpoint in {directory}: train the run first (python -m hivlp_jax.main).')
  return train.restore_latest(manager, abstract_train_state(config, model))


def params_fingerprint(params) -> str:
  """sha1 over every parameter's path, dtype, shape and bytes."""
  digest = hashlib.sha1()
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    digest.update(f'{jax.tree_util.keystr(path)}:{retrieval.fingerprint(np.asarray(leaf))};'.encode())
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
    self._embed_images, self._embed_texts = train.make_pmapped_embedders(self.model)

  def embedders(self):
    """(embed_images, embed_texts) as `evaluate.embed_split` takes them."""
    return (functools.partial(self._embed_images, self.params),
            functools.partial(self._embed_texts, self.params))

  def embed(self, side: str, inputs: np.ndarray, batch_size: Optional[int] = None) -> np.ndarray:
    """Images uint8 [N, S, S, 3] (side 'image') or tokens int32 [N, L] (side 'text') -> float32 [N, D]."""
    embed = self.embedders()[0 if side == 'image' else 1]
    return evaluate.embed_batches(embed, inputs, batch_size or self.config.eval.batch_size)


def load_run(workdir: str, config: Optional[ml_collections.ConfigDict] = None) -> Run:
  """Restores the latest checkpoint of the run in `workdir` (config: see `load_config`)."""
  config = load_config(workdir, config)
  vocab = pipeline.vocab_file(config)
  if not os.path.exists(vocab):  # get_tokenizer would train a new one, whose ids the model never saw.
    raise FileNotFoundError(f'The run\'s vocabulary {vocab} is missing (config.data.data_dir / vocab_file).')
  tokenizer = pipeline.get_tokenizer(config)
  model = train.create_model(config, tokenizer.vocab_size)
  state = restore_state(workdir, config, model)
  return Run(workdir=workdir, config=config, tokenizer=tokenizer, model=model, step=int(state.step),
             params=flax.jax_utils.replicate(state.params), params_fingerprint=params_fingerprint(state.params))


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
  """
  name: str
  key: str
  side: str
  inputs: np.ndarray
  labels: list[str]
  images: np.ndarray
  image_ids: np.ndarray

  @property
  def size(self) -> int:
    return self.inputs.shape[0]


def split_galleries(run: Run, split: str) -> tuple[Gallery, Gallery]:
  """The images (labelled with their first caption) and the captions of a split of the run's data set."""
  data = pipeline.load_split(run.config, split, run.tokenizer)
  images = Gallery(name=f'{split} images', key=split, side='image', inputs=data.images,
                   labels=[c[0] for c in data.captions], images=data.images,
                   image_ids=np.arange(data.num_images))
  captions = Gallery(name=f'{split} captions', key=f'{split}-captions', side='text',
                     inputs=data.tokens.reshape(-1, data.tokens.shape[-1]),
                     labels=[c for row in data.captions for c in row], images=data.images,
                     image_ids=np.repeat(np.arange(data.num_images), data.captions_per_image))
  return images, captions


def load_image(path: str, size: int) -> np.ndarray:
  """An image file as the model takes it: RGB uint8 [size, size, 3] (bilinear resize)."""
  with Image.open(path) as image:
    image = image.convert('RGB')
    if image.size != (size, size):
      image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image, np.uint8)


def folder_gallery(directory: str, size: int) -> Gallery:
  """The images of a folder (sorted by name), resized to the model's `size`."""
  names = sorted(n for n in os.listdir(directory) if n.lower().endswith(IMAGE_EXTENSIONS))
  if not names:
    raise FileNotFoundError(f'No images ({", ".join(IMAGE_EXTENSIONS)}) in {directory}.')
  images = np.stack([load_image(os.path.join(directory, n), size) for n in names])
  path_hash = hashlib.sha1(os.path.abspath(directory).encode()).hexdigest()[:8]
  base = os.path.basename(os.path.normpath(directory)) or 'root'
  return Gallery(name=f'images in {directory}', key=f'dir-{base}-{path_hash}', side='image', inputs=images,
                 labels=names, images=images, image_ids=np.arange(len(names)))


@dataclasses.dataclass
class GalleryIndex:
  index: Any  # retrieval.CoarseToFineIndex ('rerank') or retrieval.ScannPrefixIndex ('truncate').
  backend: str  # 'rerank' or 'truncate'.
  directory: str
  rebuilt: bool  # The ScaNN index was built (not loaded).
  embedded: bool  # The gallery was embedded (its saved embeddings were not reused).
  stale_reasons: list[str]


def gallery_index(run: Run, gallery: Gallery, coarse_dim: int, shortlist: int, backend: str = 'auto',
                  settings: Optional[retrieval.ScannSettings] = None) -> GalleryIndex:
  """The two-stage index of `gallery`, from WORKDIR/indexes/<key>-dim<coarse_dim> when still valid.

  Saved embeddings are reused when the checkpoint step and the `source` (the gallery's inputs and the
  parameters, by fingerprint) match; the ScaNN index when, in addition, the embeddings, settings and
  resolved backend ('auto': see `retrieval.TwoStageSearch`) do.
  """
  directory = os.path.join(run.workdir, INDEX_DIR, f'{gallery.key}-dim{coarse_dim}')
  source = {'gallery': gallery.key, 'side': gallery.side, 'inputs': retrieval.fingerprint(gallery.inputs),
            'params': run.params_fingerprint}
  embeddings = index_store.cached_embeddings(directory, run.step, source)
  embedded = embeddings is None
  if embedded:
    logging.info('Embedding the %d %s.', gallery.size, gallery.name)
    embeddings = run.embed(gallery.side, gallery.inputs)
  stored = index_store.load_or_build(directory, embeddings, run.step, coarse_dim, shortlist, settings,
                                     source=source, backend=backend)
  return GalleryIndex(stored.index(), stored.backend, directory, stored.rebuilt, embedded,
                      stored.stale_reasons)


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
  scores, indices = found.index.search(embedding, k)
  hits = [Hit(rank + 1, int(i), float(s), gallery.labels[int(i)])
          for rank, (s, i) in enumerate(zip(scores[0], indices[0])) if i >= 0]
  return QueryResult(kind, text_or_path, query_image, embedding[0], gallery, hits, run.step, found)


def _item_name(gallery: Gallery, index: int) -> str:
  if gallery.side == 'text':
    return f'caption {index} (image {gallery.image_ids[index]})'
  return f'image {index}'


def format_result(result: QueryResult) -> str:
  """The hits as printed: a header, then one line per hit with its rank, score, item and label."""
  found = result.index
  status = ('rebuilt' + (f' ({"; ".join(found.stale_reasons)})' if found.stale_reasons else '')
            if found.rebuilt else 'reused')
  lines = [f'{result.kind} query: {result.query!r}',
           f'  top {len(result.hits)} of {result.gallery.size} {result.gallery.name} at step {result.step} '
           f'(index {found.directory}, {found.backend}: {status}; '
           f'embeddings {"computed" if found.embedded else "reused"})']
  folder = result.gallery.key.startswith('dir-')
  for hit in result.hits:
    item = '' if folder else f'{_item_name(result.gallery, hit.index):<26}'
    lines.append(f'  {hit.rank:>3}. {hit.score:7.4f}  {item}{hit.label}')
  return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------------
# Contact sheet and HTML page.


def resize_tile(image: np.ndarray, tile: int) -> Image.Image:
  """uint8 [h, w, 3] -> a tile x tile PIL image: nearest-neighbour up (crisp pixels), bilinear down."""
  method = Image.NEAREST if tile >= max(image.shape[:2]) else Image.BILINEAR
  return Image.fromarray(np.asarray(image, np.uint8)).resize((tile, tile), method)


def sheet_size(num_rows: int, num_columns: int, tile: int) -> tuple[int, int]:
  """(width, height) in pixels of a contact sheet."""
  return (PAD + num_columns * (tile + PAD), PAD + num_rows * (HEADER_HEIGHT + TITLE_HEIGHT + tile + PAD))


def tile_origin(row: int, column: int, tile: int) -> tuple[int, int]:
  """(x, y) of the top-left pixel of a tile's image on the sheet."""
  row_top = PAD + row * (HEADER_HEIGHT + TITLE_HEIGHT + tile + PAD)
  return PAD + column * (tile + PAD), row_top + HEADER_HEIGHT + TITLE_HEIGHT


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
  if draw.textlength(text, font=font) <= width:
    return text
  while text and draw.textlength(text + '...', font=font) > width:
    text = text[:-1]
  return text + '...'


def _tiles(result: QueryResult) -> list[tuple[np.ndarray, str]]:
  """(image, title) per tile of a result's row: the query image first for image queries."""
  tiles = [] if result.query_image is None else [(result.query_image, 'query')]
  gallery = result.gallery
  for hit in result.hits:  # Wide gaps: the default font's spaces are narrow.
    tiles.append((gallery.images[gallery.image_ids[hit.index]], f'#{hit.rank}   {hit.score:.3f}'))
  return tiles


def _header(result: QueryResult) -> str:
  return f'{result.kind} query:  {result.query}   ->   {result.gallery.name}'


def contact_sheet(results: Sequence[QueryResult], tile: int = 128) -> Image.Image:
  """One row per query: its retrieved images, upscaled to tile x tile, titled '#rank score'."""
  rows = [(_header(r), _tiles(r)) for r in results]
  width, height = sheet_size(len(rows), max(1, max(len(t) for _, t in rows)), tile)
  sheet = Image.new('RGB', (width, height), 'white')
  draw = ImageDraw.Draw(sheet)
  font = ImageFont.load_default()
  for row, (header, tiles) in enumerate(rows):
    x, y = tile_origin(row, 0, tile)
    draw.text((x, y - HEADER_HEIGHT - TITLE_HEIGHT), _fit(draw, header, width - 2 * PAD, font), fill='black',
              font=font)
    for column, (image, title) in enumerate(tiles):
      x, y = tile_origin(row, column, tile)
      draw.text((x, y - TITLE_HEIGHT), _fit(draw, title, tile, font), fill='black', font=font)
      sheet.paste(resize_tile(image, tile), (x, y))
  return sheet


def _png_data_uri(image: Image.Image) -> str:
  buffer = io.BytesIO()
  image.save(buffer, format='PNG')
  return 'data:image/png;base64,' + base64.b64encode(buffer.getvalue()).decode('ascii')


def html_page(results: Sequence[QueryResult], tile: int = 128) -> str:
  """A self-contained page: per query, its hits as inline PNGs with rank, score and caption or name."""
  parts = ['<!doctype html>', '<html><head><meta charset="utf-8"><title>hivlp_jax query</title><style>',
           'body{font-family:sans-serif;margin:1em} figure{display:inline-block;margin:4px;vertical-align:top;'
           f'width:{tile}px;font-size:12px}} img{{image-rendering:pixelated}} .query{{outline:2px solid #c33}}',
           '</style></head><body>']
  for result in results:
    parts.append(f'<h2>{html.escape(result.kind)}: {html.escape(result.query)}</h2>')
    parts.append(f'<p>top {len(result.hits)} of {result.gallery.size} {html.escape(result.gallery.name)}, '
                 f'checkpoint step {result.step}</p><div>')
    if result.query_image is not None:
      parts.append(f'<figure class="query"><img src="{_png_data_uri(resize_tile(result.query_image, tile))}" '
                   f'width="{tile}" height="{tile}"><figcaption>query</figcaption></figure>')
    gallery = result.gallery
    for hit in result.hits:
      uri = _png_data_uri(resize_tile(gallery.images[gallery.image_ids[hit.index]], tile))
      parts.append(f'<figure><img src="{uri}" width="{tile}" height="{tile}"><figcaption>#{hit.rank} '
                   f'{hit.score:.4f}<br>{html.escape(_item_name(gallery, hit.index))}: '
                   f'{html.escape(hit.label)}</figcaption></figure>')
    parts.append('</div>')
  parts.append('</body></html>')
  return '\n'.join(parts)


# ----------------------------------------------------------------------------------------------------
# Entry points.


def query(workdir: str, texts: Sequence[str] = (), images: Sequence[str] = (),
          config: Optional[ml_collections.ConfigDict] = None, split: str = 'test',
          image_dir: Optional[str] = None,
          k: int = 5, coarse_dim: Optional[int] = None, shortlist: Optional[int] = None,
          backend: Optional[str] = None, contact_sheet_path: Optional[str] = None,
          html_path: Optional[str] = None, tile: int = 128, out: Optional[TextIO] = None
          ) -> list[QueryResult]:
  """Runs text and image queries against a run's gallery, prints the hits to `out` (stdout) and writes
  the contact sheet and HTML page when asked. Returns one QueryResult per query, texts first.

  `backend`: 'auto', 'rerank' or 'truncate' (`retrieval.TwoStageSearch`); None: the config's
  eval.two_stage_backend."""
  if not texts and not images:
    raise ValueError('Give at least one query: a text or an image.')
  if k < 1:
    raise ValueError(f'k={k} must be at least 1.')
  if backend is not None and backend not in retrieval.BACKENDS:
    raise ValueError(f'backend={backend!r} is not one of {retrieval.BACKENDS}.')
  missing = [path for path in images if not os.path.isfile(path)]
  if missing:  # Before the seconds it takes to restore the run.
    raise FileNotFoundError(f'No such image file: {", ".join(missing)}.')
  out = out or sys.stdout
  run = load_run(workdir, config)
  default_dim, default_shortlist = (tuple(run.config.eval.two_stage[0]) if run.config.eval.two_stage
                                    else (run.config.model.nested_dims[0], 100))
  coarse_dim, shortlist = coarse_dim or default_dim, shortlist or default_shortlist
  backend = backend or run.config.eval.two_stage_backend
  settings = retrieval.ScannSettings.from_config(run.config.eval.scann)
  if coarse_dim > run.config.model.embed_dim:
    raise ValueError(f'coarse_dim={coarse_dim} exceeds the embedding dim {run.config.model.embed_dim}.')
  if image_dir:
    image_gallery = folder_gallery(image_dir, run.config.model.image_size)
    caption_gallery = image_gallery  # A folder has no captions: image queries find similar images.
  else:
    image_gallery, caption_gallery = split_galleries(run, split)
  indexes = {}

  def index(gallery: Gallery) -> GalleryIndex:
    if gallery.key not in indexes:  # ScaNN is built for `shortlist` neighbours: k may need more.
      indexes[gallery.key] = gallery_index(run, gallery, coarse_dim, max(shortlist, k), backend, settings)
    return indexes[gallery.key]

  results = [search(run, index(image_gallery), image_gallery, 'text', t, k) for t in texts]
  results += [search(run, index(caption_gallery), caption_gallery, 'image', path, k) for path in images]
  for result in results:
    print(format_result(result), file=out)
  if contact_sheet_path:
    contact_sheet(results, tile).save(contact_sheet_path)
    print(f'Wrote the contact sheet {contact_sheet_path}.', file=out)
  if html_path:
    with open(html_path, 'w', encoding='utf-8') as f:
      f.write(html_page(results, tile))
    print(f'Wrote {html_path}.', file=out)
  return results


def define_flags() -> None:
  """The command-line flags; defined only when run as a program (hivlp_jax.main defines --config too)."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      'config', None, 'Config file; default: the run\'s own (WORKDIR/config.json).', lock_config=True)
  flags.DEFINE_string('workdir', None, 'The training run: its checkpoints, config.json and saved indexes.')
  flags.DEFINE_multi_string('text', [], 'A text query (repeat for several): finds images.')
  flags.DEFINE_multi_string('image', [], 'An image file to query with: finds captions (or --image_dir images).')
  flags.DEFINE_string('split', 'test', 'The data set split searched.')
  flags.DEFINE_string('image_dir', None, 'Search the images of this folder instead of a split.')
  flags.DEFINE_integer('k', 5, 'Results per query.')
  flags.DEFINE_integer('coarse_dim', None, 'Coarse (ScaNN) prefix dim; default config.eval.two_stage[0].')
  flags.DEFINE_integer('shortlist', None, 'Items re-ranked at full dim; default config.eval.two_stage[0].')
  flags.DEFINE_enum('backend', None, list(retrieval.BACKENDS),
                    'How the two stages run: rerank (ScaNN shortlist, numpy re-rank), truncate (one ScaNN '
                    'searcher in truncate mode) or auto (truncate for galleries of 20,000 items and more); '
                    'default config.eval.two_stage_backend.')
  flags.DEFINE_string('contact_sheet', None, 'Write a PNG contact sheet of the retrieved images here.')
  flags.DEFINE_string('html', None, 'Write an HTML page of the results (inline images) here.')
  flags.DEFINE_integer('tile', 128, 'Contact sheet / HTML image size in pixels.')
  flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  log_filter.quiet_library_logs()
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  query(FLAGS.workdir, texts=FLAGS.text, images=FLAGS.image, config=FLAGS.config, split=FLAGS.split,
        image_dir=FLAGS.image_dir, k=FLAGS.k, coarse_dim=FLAGS.coarse_dim, shortlist=FLAGS.shortlist,
        backend=FLAGS.backend, contact_sheet_path=FLAGS.contact_sheet, html_path=FLAGS.html, tile=FLAGS.tile)


if __name__ == '__main__':
  define_flags()
  app.run(main)
