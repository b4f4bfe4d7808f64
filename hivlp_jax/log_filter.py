"""Keeps a run's log readable: drops the INFO chatter of orbax, TFDS and etils (a line per file written)."""

import logging as std_logging

from absl import logging

_CHATTY = ('/orbax/', '/tensorflow_datasets/', '/etils/')


class _QuietLibraries:

  def filter(self, record) -> bool:
    # The standard library's WARNING: absl's `logging.WARNING` is its own verbosity level, -1.
    return record.levelno >= std_logging.WARNING or not any(part in record.pathname for part in _CHATTY)


def quiet_library_logs() -> None:
  """Call once in a program's main, after absl has installed its handler."""
  logging.get_absl_handler().addFilter(_QuietLibraries())
