"""WORKDIR/run.lock: one training run per workdir at a time."""

import os
import socket
import time

from absl import logging
import jax

from hivlp_jax import errors
from hivlp_jax import files

LOCK_FILE = 'run.lock'


class WorkdirLock:
  """WORKDIR/run.lock while a run trains there: a second run refuses to start, naming the first.

  A lock whose process is gone (same host, pid not alive) is stale and taken over. Only process 0 of a
  multi-process job holds it.
  """

  def __init__(self, workdir: str):
    self.path = files.path(workdir) / LOCK_FILE
    self.held = False

  def __enter__(self):
    if jax.process_index() != 0:
      return self
    me = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.strftime('%Y-%m-%d %H:%M:%S')}
    if self.path.exists():
      try:
        owner = files.read_json(self.path)
      except ValueError:
        owner = {}
        logging.warning('The lock %s is unreadable (a run killed while writing it?); taking it over.', self.path)
      if owner.get('host') == me['host'] and not _pid_alive(int(owner.get('pid', -1))):
        logging.warning('Taking over the stale lock %s of process %s, which is gone.', self.path, owner.get('pid'))
      elif owner:
        raise errors.RunStateError(f'Another run is training in this workdir: process {owner.get("pid")} on host '
                                   f'{owner.get("host")!r}, started {owner.get("started")} ({self.path}). Wait for it, '
                                   'use another --workdir, or delete the lock file if that run is gone.')
    files.write_json(self.path, me)
    self.held = True
    return self

  def __exit__(self, *exc):
    if self.held and self.path.exists():
      self.path.unlink()
    self.held = False


def _pid_alive(pid: int) -> bool:
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True
