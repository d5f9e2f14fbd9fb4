"""Library noise goes to `<workdir>/library.log`; the terminal keeps the run's own lines.

A recovery the run handles (a damaged checkpoint set aside, a save that failed
on a full disk) makes orbax, tensorstore and asyncio print hundreds of lines:
tracebacks of their background tasks ("Event loop is closed", "Task exception
was never retrieved") and their own error records. They explain nothing the
run's one line does not, and they bury it. `route_to_workdir` sends them to a
log file in the workdir instead:

  * `sys.stderr` becomes a router: what the run writes itself (absl log
    records of its own modules, the one-line errors, a bug's traceback) goes
    to the terminal; anything else written there (library tracebacks, warnings,
    "Exception ignored in ...") goes to the log file;
  * log records of the noisy libraries go to the log file at every level.

The file is opened (never through a link) once the workdir exists, so a run
that fails its checks leaves no workdir; lines written before that are kept in
memory and shown on the terminal at exit if the workdir never appeared.
"""

import atexit
import contextlib
import io
import os
import sys
import threading

from absl import logging

from semimeta_jax import workdir_files

LOG_FILE = workdir_files.LIBRARY_LOG
# Whose log records are noise on the terminal: the checkpoint stack's.
_NOISY_SOURCES = ('/orbax/', '/tensorstore/', '/asyncio/')
_MAX_BUFFERED_CHARS = 1 << 20

_local = threading.local()


@contextlib.contextmanager
def to_terminal():
  """Within the block, this thread's writes to `sys.stderr` go to the terminal."""
  previous = getattr(_local, 'to_terminal', False)
  _local.to_terminal = True
  try:
    yield
  finally:
    _local.to_terminal = previous


class _Router(io.TextIOBase):
  """`sys.stderr` while routing: the terminal under `to_terminal`, else the workdir's log file."""

  def __init__(self, workdir: str, terminal):
    super().__init__()
    self._path = os.path.join(workdir, LOG_FILE)
    self._workdir = workdir
    self._terminal = terminal
    self._file = None
    self._buffer: list[str] = []
    self._buffered = 0
    self._lock = threading.Lock()

  @property
  def terminal(self):
    return self._terminal

  def _open_once_the_workdir_exists(self):
    if self._file is None and os.path.isdir(self._workdir):
      try:
        self._file = workdir_files.open_append(self._path)
      except workdir_files.WorkdirFileError:
        self._file = self._terminal  # Better seen than lost.
      self._file.write(''.join(self._buffer))
      self._buffer, self._buffered = [], 0

  def write(self, text: str) -> int:
    if getattr(_local, 'to_terminal', False):
      return self._terminal.write(text)
    with self._lock:
      self._open_once_the_workdir_exists()
      if self._file is not None:
        self._file.write(text)
        self._file.flush()
      elif self._buffered < _MAX_BUFFERED_CHARS:
        self._buffer.append(text)
        self._buffered += len(text)
    return len(text)

  def flush(self):
    self._terminal.flush()
    if self._file is not None:
      self._file.flush()

  def fileno(self) -> int:
    return self._terminal.fileno()

  def isatty(self) -> bool:
    return self._terminal.isatty()

  @property
  def encoding(self):
    return self._terminal.encoding

  def finish(self):
    """At exit: kept lines go to the log file, or to the terminal if the workdir never appeared."""
    with self._lock:
      if self._buffer:
        self._open_once_the_workdir_exists()
      pending, self._buffer = ''.join(self._buffer), []
      if pending:
        self._terminal.write(pending)
        self._terminal.flush()
      if self._file is not None and self._file is not self._terminal:
        self._file.close()
        self._file = None


def _is_noise(record) -> bool:
  return any(part in record.pathname for part in _NOISY_SOURCES)


def route_to_workdir(workdir: str):
  """Sends library noise to `<workdir>/library.log` from now on (local workdirs only).

  Args:
    workdir: the run directory (an absolute local path); it need not exist yet.
  """
  if workdir_files.is_remote(workdir) or isinstance(sys.stderr, _Router):
    return
  router = _Router(workdir, sys.stderr)
  handler = logging.get_absl_handler().python_handler
  emit = handler.emit

  def routed_emit(record):
    if _is_noise(record):
      router.write(handler.format(record) + '\n')
      return
    with to_terminal():
      emit(record)

  handler.emit = routed_emit
  excepthook = sys.excepthook

  def terminal_excepthook(*args):
    with to_terminal():  # A bug's traceback belongs on the terminal.
      excepthook(*args)

  sys.excepthook = terminal_excepthook
  sys.stderr = router
  atexit.register(router.finish)
