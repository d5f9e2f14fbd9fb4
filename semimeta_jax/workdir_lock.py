"""One owner per run directory: a lock file taken before anything is written.

`<workdir>/LOCK` holds its owner's host, pid and start time. On a local (or
NFS) file system the file is locked with `flock`, which the kernel releases
when the owner dies however it dies: a LOCK file whose flock is free was left
by a killed run and is taken over, with no guessing from pids. A held one makes
a second run fail with a message naming the holder.

A multi-process job is one owner: process 0 takes the lock and the others
skip it, since only process 0 writes the workdir's records and orbax
coordinates the processes' checkpoint writes itself.

Remote paths (gs://...) have no file locks; the record is written for the
record's sake and a warning says that no exclusion is enforced there.
"""

import fcntl
import json
import os
import socket
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from semimeta_jax import errors
from semimeta_jax import workdir_files

LOCK_FILE = 'LOCK'


class WorkdirLockedError(errors.UserError, RuntimeError):
  """Another live run owns the run directory."""


def _holder(path: str) -> str:
  try:
    with open(path, encoding='utf-8') as f:
      record = json.load(f)
    return (f'pid {record["pid"]} on host {record["host"]}, started '
            f'{record["started"]}')
  except (OSError, ValueError, KeyError, TypeError):
    return 'a process whose record is unreadable'


class WorkdirLock:
  """Holds `<workdir>/LOCK` from `acquire` (or `with`) until `release`.

  A run directory that this lock created and that holds nothing else when the
  lock is released is removed again, so a run that fails before writing
  anything leaves no trace.
  """

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    """Prepares the lock.

    Args:
      workdir: the run directory (created by `acquire` if absent).
      enabled: whether this process takes the lock; None means process 0 only.
    """
    self.workdir = os.fspath(workdir)
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self._fd = None
    self._created_dir = False

  def acquire(self):
    """Takes the lock, or raises `WorkdirLockedError` naming its holder (in every process).

    Before taking it, the workdir is checked (`workdir_files.check_workdir`):
    a link out of it or a record that is not a file is a `WorkdirFileError`.
    """
    error = None
    if self.enabled:
      try:
        self._acquire()
      except errors.UserError as e:  # Held by another run, or a workdir no run can use.
        error = e
    if jax.process_count() > 1:
      # The other processes must not go on alone into collectives process 0 never joins.
      refused = multihost_utils.process_allgather(np.int32(error is not None))
      if error is None and np.max(refused):
        self.release()
        raise WorkdirLockedError(
            f'{self.workdir} is in use by another run or unusable (see process 0\'s error).')
    if error is not None:
      raise error
    return self

  def _acquire(self):
    if '://' in self.workdir:
      logging.warning('%s is remote: no file lock there, so nothing stops a second run '
                      'on it.', self.workdir)
      return
    # Already there, or made by a run starting at the same time: not ours to remove.
    self._created_dir = workdir_files.make_dirs(self.workdir)
    try:
      # Nothing is written before this: orbax and TensorBoard write there too.
      workdir_files.check_workdir(self.workdir)
    except workdir_files.WorkdirFileError:
      self._remove_created_dir()
      raise
    while True:
      try:
        fd = workdir_files.open_lock_file(self.path)
      except workdir_files.WorkdirFileError:
        self._remove_created_dir()
        raise
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        self._remove_created_dir()
        raise WorkdirLockedError(
            f'{self.workdir} is in use by another run ({_holder(self.path)}; lock {self.path}). '
            'Wait for it to finish or stop it, or use another --workdir.') from None
      # A releasing owner unlinks the file before unlocking it: if the file we
      # locked is no longer the one at the path, try again on the new one.
      try:
        same = os.path.samestat(os.fstat(fd), os.stat(self.path))
      except FileNotFoundError:
        same = False
      if same and os.fstat(fd).st_nlink > 1:
        # A hard link shares its content with a file elsewhere: writing the record would
        # overwrite that file. Only the workdir's name is removed; the lock is taken on a new file.
        logging.warning('%s was a hard link to a file elsewhere; left that file as it was and '
                        'took the lock on a new file.', self.path)
        os.unlink(self.path)
        same = False
      if same:
        break
      os.close(fd)
    previous = os.read(fd, 4096)
    if previous.strip():
      logging.warning('Taking over the stale lock %s of a run that is gone (%s).',
                      self.path, previous.decode(errors='replace').strip())
    record = {'host': socket.gethostname(), 'pid': os.getpid(),
              'started': time.strftime('%Y-%m-%d %H:%M:%S %Z')}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + '\n').encode(), 0)
    os.fsync(fd)
    self._fd = fd

  def _remove_created_dir(self):
    if self._created_dir:
      try:
        # The libraries' log alone is not a record of the run.
        if os.listdir(self.workdir) == [workdir_files.LIBRARY_LOG]:
          os.unlink(os.path.join(self.workdir, workdir_files.LIBRARY_LOG))
        os.rmdir(self.workdir)  # Only if empty: never removes anything written.
      except OSError:
        pass
      self._created_dir = False

  def release(self):
    """Removes the lock file and releases the lock."""
    if self._fd is None:
      return
    # Unlink first, then unlock: a waiter that locked the old file sees that
    # it was unlinked and retries on a new one.
    try:
      os.unlink(self.path)
    except FileNotFoundError:
      pass
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None
    self._remove_created_dir()

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc_info):
    self.release()
