r"""Queries a trained run: a caption or an image in, the top-k of a gallery out.

  python -m hivlp_jax.query --workdir=runs/default --text="a small red circle in the top left" \
      [--image=scene.png] [--split=test] [--k=5] [--num_shards=1] [--contact_sheet=out.png] [--html=out.html]

--text searches the images of the data set's --split (or of a folder, --image_dir) and prints each hit's
index, score and first caption (its file name for a folder). --image searches the split's captions
(the images of --image_dir with --image_dir). Both may be given; each is its own query. Files of
--image_dir that are not readable images are skipped, each named in the log, and counted in the output.

The config is the run's own by default: the flattened config that training recorded in
WORKDIR/config.json, parsed back over configs/default.py (whose field types tell tuples from strings).
--config=FILE [--config.x=y ...] gives it explicitly instead; it must agree with config.json on the
model and the vocabulary (the checkpoint would not load otherwise).

The parameters of the latest checkpoint are restored (`gallery.load_run`). The gallery's embeddings and a
two-stage index over them (ScaNN over the --coarse_dim prefixes shortlists --shortlist items, exact
full-dim cosine re-ranks them; defaults: config.eval.two_stage[0]) are saved under
WORKDIR/indexes/<gallery>-dim<coarse_dim>/ (`index_store`), where <gallery> is the split (its images),
<split>-captions, or dir-<name>-<hash> for a folder. --backend picks how the two stages run
(`coarse_to_fine.TwoStageSearch`): 'rerank' (ScaNN shortlist, re-ranked in numpy), 'truncate' (one ScaNN
searcher in truncate mode) or 'auto' (the default: truncate from ScaNN's brute-force threshold, 20,000
items, up). The next query reuses both when the checkpoint step, the parameters, the gallery's inputs
and the backend are unchanged and the saved files match their sha256; otherwise it says why and
rebuilds (the embeddings are reused when only the backend changed). --num_shards=N (N > 1) saves the
gallery in N contiguous shards in that directory (one index per shard, one top-level manifest:
`sharded_index`), as a job of N processes would, and answers each query from every shard, their top-k
merged; the default, 1, is the single index. Another shard count than the saved one rebuilds.

--contact_sheet writes a PNG with one row per query (the query image first, for image queries) of the
retrieved images upscaled to --tile pixels, each titled with its rank and score (a caption's image for
a caption); --html writes one page with the same images inline (base64 PNG) and the captions.
"""

import base64
import html
import io
import sys
from typing import Optional, Sequence, TextIO

from absl import app
from absl import flags
from absl import logging
import ml_collections
import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

from hivlp_jax import config_lib
from hivlp_jax import errors
from hivlp_jax import files
from hivlp_jax import gallery as gallery_lib
from hivlp_jax import log_filter
from hivlp_jax import retrieval

# Contact sheet layout, in pixels: margin, query line above each row, title line above each tile.
PAD, HEADER_HEIGHT, TITLE_HEIGHT = 4, 16, 14


# ----------------------------------------------------------------------------------------------------
# Text.


def _item_name(gallery: gallery_lib.Gallery, index: int) -> str:
  if gallery.side == 'text':
    return f'caption {index} (image {gallery.image_ids[index]})'
  return f'image {index}'


def format_result(result: gallery_lib.QueryResult) -> str:
  """The hits as printed: a header, then one line per hit with its rank, score, item and label."""
  found = result.index
  status = ('rebuilt' + (f' ({"; ".join(found.stale_reasons)})' if found.stale_reasons else '')
            if found.rebuilt else 'reused')
  skipped = (f'; {len(result.gallery.skipped)} unreadable files skipped' if result.gallery.skipped else '')
  point = found.operating_point
  tuned = (f'; tuned to recall@10 {point["target_recall"]:g}: {point["setting"]}, '
           f'{point["recall_at_10"]:.3f} on {point["source"]["count"]} queries' if point else '')
  shards = f' in {len(found.index.shards)} shards' if hasattr(found.index, 'shards') else ''
  lines = [f'{result.kind} query: {result.query!r}',
           f'  top {len(result.hits)} of {result.gallery.size} {result.gallery.name} at step {result.step} '
           f'(index {found.directory}{shards}, {found.backend}: {status}{tuned}; '
           f'embeddings {"computed" if found.embedded else "reused"}{skipped})']
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


def _tiles(result: gallery_lib.QueryResult) -> list[tuple[np.ndarray, str]]:
  """(image, title) per tile of a result's row: the query image first for image queries."""
  tiles = [] if result.query_image is None else [(result.query_image, 'query')]
  gallery = result.gallery
  for hit in result.hits:  # Wide gaps: the default font's spaces are narrow.
    tiles.append((gallery.images[gallery.image_ids[hit.index]], f'#{hit.rank}   {hit.score:.3f}'))
  return tiles


def _header(result: gallery_lib.QueryResult) -> str:
  return f'{result.kind} query:  {result.query}   ->   {result.gallery.name}'


def contact_sheet(results: Sequence[gallery_lib.QueryResult], tile: int = 128) -> Image.Image:
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


def _png_bytes(image: Image.Image) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format='PNG')
  return buffer.getvalue()


def _png_data_uri(image: Image.Image) -> str:
  return 'data:image/png;base64,' + base64.b64encode(_png_bytes(image)).decode('ascii')


def html_page(results: Sequence[gallery_lib.QueryResult], tile: int = 128) -> str:
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
          html_path: Optional[str] = None, tile: int = 128, out: Optional[TextIO] = None, num_shards: int = 1
          ) -> list[gallery_lib.QueryResult]:
  """Runs text and image queries against a run's gallery, prints the hits to `out` (stdout) and writes
  the contact sheet and HTML page when asked. Returns one QueryResult per query, texts first.

  `backend`: 'auto', 'rerank' or 'truncate' (`coarse_to_fine.TwoStageSearch`); None: the config's
  eval.two_stage_backend. `num_shards`: shards the saved index is split into (1: one index)."""
  if not texts and not images:
    raise errors.InputError('Give at least one query: a text or an image.')
  if k < 1:
    raise errors.InputError(f'k={k} must be at least 1.')
  if num_shards < 1:
    raise errors.InputError(f'num_shards={num_shards} must be at least 1.')
  if backend is not None and backend not in retrieval.BACKENDS:
    raise errors.InputError(f'backend={backend!r} is not one of {retrieval.BACKENDS}.')
  missing = [path for path in images if not files.path(path).is_file()]
  if missing:  # Before the seconds it takes to restore the run.
    raise errors.MissingInputError(f'No such image file: {", ".join(missing)}.')
  out = out or sys.stdout
  run = gallery_lib.load_run(workdir, config)
  default_dim, default_shortlist = (tuple(run.config.eval.two_stage[0]) if run.config.eval.two_stage
                                    else (run.config.model.nested_dims[0], 100))
  coarse_dim = default_dim if coarse_dim is None else coarse_dim  # 0 is refused below, not defaulted.
  shortlist = default_shortlist if shortlist is None else shortlist
  backend = backend or run.config.eval.two_stage_backend
  settings = retrieval.ScannSettings.from_config(run.config.eval.scann)
  if not 0 < coarse_dim <= run.config.model.embed_dim:
    raise errors.InputError(f'coarse_dim={coarse_dim} is not in [1, the embedding dim {run.config.model.embed_dim}].')
  if shortlist < 1:
    raise errors.InputError(f'shortlist={shortlist} must be at least 1.')
  if image_dir:
    image_gallery = gallery_lib.folder_gallery(image_dir, run.config.model.image_size)
    caption_gallery = image_gallery  # A folder has no captions: image queries find similar images.
  else:
    image_gallery, caption_gallery = gallery_lib.split_galleries(run, split)
  # Tuned indexes (config.eval.scann.target_recall) are tuned on the other side's items, as they are queried.
  queries_from = {image_gallery.key: caption_gallery, caption_gallery.key: image_gallery}
  indexes = {}

  def index(gallery: gallery_lib.Gallery) -> gallery_lib.GalleryIndex:
    if gallery.key not in indexes:  # ScaNN is built for `shortlist` neighbours: k may need more.
      indexes[gallery.key] = gallery_lib.gallery_index(
          run, gallery, coarse_dim, max(shortlist, k), backend, settings,
          target_recall=run.config.eval.scann.target_recall, queries_from=queries_from[gallery.key],
          min_shortlist=k, num_shards=num_shards)
    return indexes[gallery.key]

  for gallery, asked in ((image_gallery, texts), (caption_gallery, images)):
    if asked and k > gallery.size:
      logging.warning('k=%d exceeds the %d %s: all of them are returned.', k, gallery.size, gallery.name)
  results = [gallery_lib.search(run, index(image_gallery), image_gallery, 'text', t, k) for t in texts]
  results += [gallery_lib.search(run, index(caption_gallery), caption_gallery, 'image', path, k)
              for path in images]
  for result in results:
    print(format_result(result), file=out)
  if contact_sheet_path:
    files.write_bytes(contact_sheet_path, _png_bytes(contact_sheet(results, tile)))
    print(f'Wrote the contact sheet {contact_sheet_path}.', file=out)
  if html_path:
    files.write_text(html_path, html_page(results, tile))
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
  flags.DEFINE_integer('num_shards', 1, 'Save and search the gallery\'s index in this many shards (one index '
                       'per shard, one manifest; 1: a single index).')
  flags.DEFINE_string('contact_sheet', None, 'Write a PNG contact sheet of the retrieved images here.')
  flags.DEFINE_string('html', None, 'Write an HTML page of the results (inline images) here.')
  flags.DEFINE_integer('tile', 128, 'Contact sheet / HTML image size in pixels.')
  flags.mark_flags_as_required(['workdir'])


@errors.one_line_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  log_filter.quiet_library_logs()
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  query(FLAGS.workdir, texts=FLAGS.text, images=FLAGS.image, config=FLAGS.config, split=FLAGS.split,
        image_dir=FLAGS.image_dir, k=FLAGS.k, coarse_dim=FLAGS.coarse_dim, shortlist=FLAGS.shortlist,
        backend=FLAGS.backend, contact_sheet_path=FLAGS.contact_sheet, html_path=FLAGS.html, tile=FLAGS.tile,
        num_shards=FLAGS.num_shards)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=config_lib.parse_flags)
