"""The one path layer: every file a run reads or writes goes through `etils.epath`.

epath (which orbax already uses) serves local paths and object stores (gs://, s3://) alike, so a workdir may
live in a bucket. On an object store a rename is a copy, not atomic; the `.tmp` + rename below still means a
reader never sees a half-written file on a local disk, and on a bucket the last complete write wins.
"""

import io
import json
import os
from typing import Any

from etils import epath
import numpy as np

from hivlp_jax import errors

Path = epath.Path
PathLike = epath.PathLike


def path(p: PathLike) -> epath.Path:
  return epath.Path(p)


def absolute(p: PathLike) -> epath.Path:
  """`p` as an absolute path (local paths are resolved against the working directory; URIs stay)."""
  p = path(p)
  return p if '://' in str(p) else epath.Path(os.path.abspath(p))


def make_dir(p: PathLike, flag: str = '--workdir') -> epath.Path:
  """Creates the folder `p` (with its parents); a path that is a file is refused, naming `flag`."""
  folder = path(p)
  if folder.exists() and not folder.is_dir():
    raise errors.InputError(f'{flag}={str(p)!r} is a file, not a folder: pass a folder (new or a run\'s).')
  folder.mkdir(parents=True, exist_ok=True)
  return folder


def _replace_with(target: epath.Path, data: bytes) -> None:
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / (target.name + '.tmp')
  tmp.write_bytes(data)
  tmp.replace(target)


def write_bytes(p: PathLike, data: bytes) -> None:
  """Writes `data` to `p` through a temporary file, creating the parent folders."""
  _replace_with(path(p), data)


def write_json(p: PathLike, data: Any) -> None:
  """Writes `data` as indented, key-sorted JSON to `p`, atomically where the filesystem allows."""
  _replace_with(path(p), json.dumps(data, indent=2, sort_keys=True).encode())


def read_json(p: PathLike) -> Any:
  return json.loads(path(p).read_text())


def write_text(p: PathLike, text: str) -> None:
  _replace_with(path(p), text.encode())


def save_npy(p: PathLike, array: np.ndarray) -> None:
  """np.save to any epath path (np.save itself would append .npy to a temporary name)."""
  buffer = io.BytesIO()
  np.save(buffer, np.asarray(array))
  _replace_with(path(p), buffer.getvalue())


def copy_tree(source: PathLike, destination: PathLike) -> None:
  """Copies every file below `source` to the same relative path below `destination` (local or not)."""
  source = path(source)
  for root, _, names in source.walk():  # walk, not rglob: epath refuses recursive globs.
    for name in names:
      write_bytes(path(destination) / (root / name).relative_to(source), (root / name).read_bytes())


def load_npy(p: PathLike) -> np.ndarray:
  return np.load(io.BytesIO(path(p).read_bytes()), allow_pickle=False)
