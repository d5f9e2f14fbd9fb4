"""Files of a run directory, read and written so that a run writes only inside it.

Every record a run creates or replaces in its workdir (the lock, config.json,
metrics.jsonl, summary.json, the labeled split, ...) goes through this module:

  * nothing is opened for writing through a symbolic link (`O_NOFOLLOW`, and a
    replaced file is written beside it and renamed over it, which replaces a
    link rather than the file it points to);
  * `check_no_links_out` refuses, before anything is written, a workdir holding
    a symbolic link that leads out of it (orbax and TensorBoard write there too);
  * a record that cannot be read or written (a directory where a file should
    be, bytes that are not UTF-8, JSON that is not an object, a directory that
    cannot be created) is one `WorkdirFileError` naming the file.

Remote workdirs (gs://...) have no symbolic links; they are read and written
through `etils.epath`.
"""

import errno
import json
import os
from typing import Any

from etils import epath

from semimeta_jax import errors

TMP_SUFFIX = '.tmp'
# Where the libraries' tracebacks and error records go (see library_log.py).
LIBRARY_LOG = 'library.log'
# The records a run keeps at the top of its workdir: each is a regular file or absent.
RECORD_FILES = ('LOCK', 'config.json', 'metrics.jsonl', 'summary.json', 'labeled_indices.json',
                'validation_indices.json', 'normalization.json')


class WorkdirFileError(errors.UserError, OSError):
  """A file of the run directory cannot be used; the message names it and the fix."""


def is_remote(path) -> bool:
  return '://' in os.fspath(path)


def _reason(error: BaseException) -> str:
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  return f'{type(error).__name__}: {" ".join(str(error).split())[:200]}'


def _link_error(path, target: str) -> WorkdirFileError:
  return WorkdirFileError(
      f'{path} is a symbolic link (to {target}): a run writes only inside its workdir and never '
      'through a link. Remove the link (or use a new --workdir).')


def check_workdir(workdir):
  """Refuses a workdir that a run could not keep its records in, before anything is written.

  Refused: a symbolic link anywhere in it whose target lies outside it (links
  are not followed; one to a place inside is allowed, since nothing is written
  through a link), and a record of `RECORD_FILES` that is not a regular file.

  Raises:
    WorkdirFileError: naming the first such file.
  """
  if is_remote(workdir) or not os.path.isdir(workdir):
    return
  root = os.path.realpath(workdir)
  for dirpath, dirnames, filenames in os.walk(root):
    for name in sorted(dirnames + filenames):
      path = os.path.join(dirpath, name)
      if os.path.islink(path):
        target = os.path.realpath(path)
        if os.path.commonpath([root, target]) != root:
          raise _link_error(os.path.join(os.fspath(workdir), os.path.relpath(path, root)),
                            os.readlink(path))
  for name in RECORD_FILES:
    path = os.path.join(os.fspath(workdir), name)
    if os.path.lexists(path) and not os.path.islink(path) and not os.path.isfile(path):
      raise WorkdirFileError(f'{path} is not a regular file (the run keeps a record of that name '
                             'there): remove or rename it, or use a new --workdir.')


def make_dirs(directory) -> bool:
  """Creates `directory` (and its parents); returns whether it was created here.

  Raises:
    WorkdirFileError: it cannot be created (a read-only or special file system,
      a file in the way, ...).
  """
  if is_remote(directory):
    epath.Path(directory).mkdir(parents=True, exist_ok=True)
    return False
  try:
    os.makedirs(directory)
    return True
  except FileExistsError:
    if not os.path.isdir(directory):
      raise WorkdirFileError(f'{directory} exists and is not a directory: give another '
                             '--workdir.') from None
    return False
  except OSError as e:
    raise WorkdirFileError(f'the directory {directory} cannot be created ({_reason(e)}): give a '
                           '--workdir on a writable file system.') from e


def read_text(path, *, fix: str = 'repair or remove it, or use a new --workdir') -> str:
  """The text of a workdir file.

  Raises:
    WorkdirFileError: it cannot be read or is not UTF-8 text.
  """
  try:
    return epath.Path(path).read_bytes().decode('utf-8')
  except (OSError, UnicodeDecodeError) as e:
    raise WorkdirFileError(f'{path} cannot be read as UTF-8 text ({_reason(e)}); {fix}.') from e


def read_json_object(path, *, fix: str = 'repair or remove it, or use a new --workdir'
                     ) -> dict[str, Any]:
  """A workdir file holding one JSON object.

  Raises:
    WorkdirFileError: it cannot be read, is not JSON or is not a JSON object.
  """
  text = read_text(path, fix=fix)
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise WorkdirFileError(f'{path} is not valid JSON ({e}); {fix}.') from e
  if not isinstance(value, dict):
    raise WorkdirFileError(f'{path} holds a JSON {type(value).__name__}, not an object; {fix}.')
  return value


def _open_new(path) -> int:
  """A new file at `path` for writing; a leftover file or link of that name is removed first."""
  try:
    if os.path.islink(path) or os.path.isfile(path):
      os.unlink(path)  # Removes a link itself, never what it points to.
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
  except OSError as e:
    raise WorkdirFileError(f'{path} cannot be written ({_reason(e)}); remove whatever is in '
                           'its place, or use a new --workdir.') from e


def _write_all(fd: int, data: bytes, path):
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
  except OSError as e:
    raise WorkdirFileError(f'writing {path} failed ({_reason(e)}).') from e


def write_atomically(path, data: str | bytes):
  """Replaces `path` with `data`, written beside it and renamed over it.

  Readers never see a half-written file, and a link at `path` is replaced,
  not written through.

  Raises:
    WorkdirFileError: the file cannot be written or replaced.
  """
  data = data.encode('utf-8') if isinstance(data, str) else data
  if is_remote(path):
    path = epath.Path(path)
    tmp = path.parent / (path.name + TMP_SUFFIX)
    tmp.write_bytes(data)
    tmp.replace(path)
    return
  path = os.fspath(path)
  tmp = path + TMP_SUFFIX
  _write_all(_open_new(tmp), data, tmp)
  try:
    os.replace(tmp, path)
  except OSError as e:
    raise WorkdirFileError(f'{path} cannot be replaced ({_reason(e)}); remove whatever is in '
                           'its place, or use a new --workdir.') from e


def write_new(path, data: str):
  """Writes `data` to `path`, which must not exist yet (e.g. a kept copy of a record)."""
  if is_remote(path):
    epath.Path(path).write_text(data)
    return
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
  except OSError as e:
    raise WorkdirFileError(f'{path} cannot be created ({_reason(e)}).') from e
  _write_all(fd, data.encode('utf-8'), path)


def open_append(path):
  """`path` opened for appending text, created if absent, never through a link.

  Raises:
    WorkdirFileError: it is a link, a directory, or cannot be opened.
  """
  if is_remote(path):
    return epath.Path(path).open('a')
  try:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise _link_error(path, os.readlink(path)) from e
    raise WorkdirFileError(f'{path} cannot be opened for appending ({_reason(e)}); remove '
                           'whatever is in its place, or use a new --workdir.') from e
  return os.fdopen(fd, 'a', encoding='utf-8')


def open_lock_file(path) -> int:
  """A read-write descriptor of the lock file at `path`, created if absent, never through a link."""
  try:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise _link_error(path, os.readlink(path)) from e
    raise WorkdirFileError(f'the lock file {path} cannot be opened ({_reason(e)}); remove '
                           'whatever is in its place, or use a new --workdir.') from e
