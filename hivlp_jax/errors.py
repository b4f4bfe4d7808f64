"""Errors a user can fix: a bad config value, a missing file, a workdir in a state the run cannot use.

Their messages name the input and what to do, so the entry points (main, query) print them as one line
instead of a traceback. They subclass the built-in types they replace, so `except ValueError` (or
FileNotFoundError, RuntimeError) still catches them. Any other exception is a bug and keeps its traceback.
"""

import functools
import sys
from typing import Any, Callable


class InputError(ValueError):
  """A bad input value: a config field, a flag, a malformed file."""


class MissingInputError(InputError, FileNotFoundError):
  """A file or folder the run needs does not exist."""


class RunStateError(InputError, RuntimeError):
  """The workdir or the data cannot be used as they are (locked, nothing restorable, no usable example)."""


class NonFiniteError(InputError, FloatingPointError):
  """Training stopped on non-finite losses or updates (lower the learning rate or check the data)."""


def one_line_errors(main: Callable[..., Any]) -> Callable[..., Any]:
  """Wraps an entry point's main: an InputError ends the program with its message alone (status 1)."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except InputError as e:
      sys.exit(f'Error: {e}')

  return wrapped
