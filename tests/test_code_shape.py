"""The package's shape: no import cycles, modules of a readable size, every file through the path layer."""

import ast
import pathlib

import numpy as np
import pytest

from hivlp_jax import files
from tests.conftest import workdir_io_guard

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'hivlp_jax'
MAX_LINES = 360
# The only module that may touch files directly: it is the path layer (etils.epath) everything else uses.
PATH_LAYER = 'files.py'
# Calls that take a path and bypass epath, so they would fail on a gs:// workdir.
DIRECT_FILE_CALLS = {'open', 'os.replace', 'os.rename', 'os.makedirs', 'os.listdir', 'os.remove', 'os.path.exists',
                     'os.path.isdir', 'os.path.isfile', 'np.save', 'np.load', 'shutil.rmtree', 'shutil.move',
                     'glob.glob', 'tarfile.open', 'Image.open'}


def _modules():
  return sorted(p for p in PACKAGE.rglob('*.py') if p.name != '__init__.py')


def _name(path: pathlib.Path) -> str:
  return '.'.join(('hivlp_jax',) + path.relative_to(PACKAGE).with_suffix('').parts)


def _imports(path: pathlib.Path) -> set[str]:
  """hivlp_jax modules imported anywhere in the file (also inside functions: a cycle is a cycle)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('hivlp_jax'):
      names.update(f'{node.module}.{alias.name}' for alias in node.names)
      names.add(node.module)
    elif isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names if alias.name.startswith('hivlp_jax'))
  return names


def test_no_import_cycles():
  graph = {_name(p): _imports(p) for p in _modules()}
  graph = {module: {m for m in imported if m in graph and m != module} for module, imported in graph.items()}
  state = {}

  def visit(module, stack):
    state[module] = 'open'
    for child in sorted(graph[module]):
      if state.get(child) == 'open':
        cycle = stack[stack.index(child):] + [child]
        pytest.fail('Import cycle: ' + ' -> '.join(cycle))
      if child not in state:
        visit(child, stack + [child])
    state[module] = 'done'

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  assert len(graph) > 20  # The walk saw the package.


@pytest.mark.parametrize('path', _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_is_of_readable_size(path):
  assert len(path.read_text().splitlines()) <= MAX_LINES


def _call_name(node: ast.Call) -> str:
  parts, func = [], node.func
  while isinstance(func, ast.Attribute):
    parts.append(func.attr)
    func = func.value
  if isinstance(func, ast.Name):
    parts.append(func.id)
  elif parts:  # A method of an expression's result, e.g. files.path(p).open(): not a bare call.
    parts.append('<expression>')
  return '.'.join(reversed(parts))


@pytest.mark.parametrize('path', _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_files_are_read_and_written_through_the_path_layer(path):
  """No direct file call on a path outside files.py (a file object from epath, e.g. Image.open(f), is fine)."""
  if path.name == PATH_LAYER:
    return
  bad = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Call) and _call_name(node) in DIRECT_FILE_CALLS:
      if not node.args:  # E.g. tarfile.open(fileobj=f): reads a file object.
        continue
      first = node.args[0]
      # io.BytesIO(...) or a file object from epath's open() are not paths.
      if isinstance(first, ast.Call) and _call_name(first).endswith(('BytesIO', 'open')):
        continue
      if isinstance(first, ast.Name) and first.id in ('f', 'file', 'fileobj', 'buffer', 'stream', 'handle'):
        continue
      bad.append(f'line {node.lineno}: {_call_name(node)}(...)')
  assert not bad, f'{path.name} bypasses hivlp_jax/files.py: {bad}'


def test_the_workdir_io_guard_catches_a_bypass_and_lets_the_path_layer_through(tmp_path):
  with workdir_io_guard(str(tmp_path)):
    files.write_json(tmp_path / 'ok.json', {'a': 1})
    files.save_npy(tmp_path / 'ok.npy', np.zeros(3))
    assert files.read_json(tmp_path / 'ok.json') == {'a': 1}
  with pytest.raises(AssertionError, match='1 workdir files bypassed hivlp_jax.files'):
    with workdir_io_guard(str(tmp_path)):
      np.save(str(tmp_path / 'bypass.npy'), np.zeros(3))  # numpy's own open(): what breaks on gs://.
