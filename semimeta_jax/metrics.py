"""Metric writers (TensorBoard and JSON lines) and the run summary (progress reports: progress.py).

Everything here writes from process 0 only, so a multi-process run produces one
set of files.
"""

import json
import math
from typing import Any, Mapping

from absl import logging
from etils import epath
import jax
import numpy as np

from semimeta_jax import errors
from semimeta_jax import workdir_files

METRICS_FILE = 'metrics.jsonl'
SUMMARY_FILE = 'summary.json'


def _to_float(value) -> float | None:
  """A Python float from a Python, NumPy or JAX scalar; None if not finite (strict JSON)."""
  value = float(np.asarray(value))
  return value if math.isfinite(value) else None


class MetricsFileError(errors.UserError, ValueError):
  """A line of metrics.jsonl other than the last is damaged."""


def _parse_rows(path: epath.Path) -> tuple[list[dict[str, Any]], str | None]:
  """(rows, torn last line or None) of a metrics file; raises on a damaged line elsewhere."""
  lines = workdir_files.read_text(path).splitlines(keepends=True)
  rows = []
  for number, line in enumerate(lines, start=1):
    try:
      row = json.loads(line)
      if not isinstance(row, dict):
        raise ValueError(f'a JSON {type(row).__name__}, not an object')
      rows.append(row)
    except ValueError as e:  # json.JSONDecodeError included.
      if number == len(lines) and not line.endswith('\n'):
        return rows, line  # A crash in the middle of the last write.
      raise MetricsFileError(f'{path}, line {number} is not a JSON row ({e}): repair or delete '
                             'that line, then rerun.') from e
  return rows, None


def read_rows(workdir: str) -> list[dict[str, Any]]:
  """The rows of `<workdir>/metrics.jsonl` ([] if absent), a torn last line dropped with a warning."""
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  rows, torn = _parse_rows(path)
  if torn is not None:
    logging.warning('Ignoring the torn last line of %s (a run stopped while writing it): %r',
                    path, torn[:80])
  return rows


def _drop_torn_tail(path: epath.Path):
  """Cuts a torn last line off `path`, so appended rows start on a line of their own."""
  if not path.exists():
    return
  _, torn = _parse_rows(path)
  if torn is not None:
    logging.warning('Removing the torn last line of %s (a run stopped while writing it): %r',
                    path, torn[:80])
    text = path.read_bytes()
    # Rewritten rather than truncated in place: remote files cannot be truncated.
    workdir_files.write_atomically(path, text[:len(text) - len(torn.encode())])


class _LogWriter:
  """The log half of clu's default writer, where TensorBoard's (TensorFlow) is unavailable."""

  def write_scalars(self, step: int, scalars: Mapping[str, float]):
    logging.info('[%d] %s', step, ', '.join(f'{k}={v:.6g}' for k, v in scalars.items()))

  def flush(self):
    pass

  def close(self):
    pass


def _default_writer(workdir: str):
  """clu's TensorBoard + log writer, or the log writer alone where TensorFlow is absent.

  clu's writers import TensorFlow; the GPU machines that run the benchmarks have neither.
  """
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    logging.warning('No TensorBoard summaries (%s); metrics go to %s and the log.', error,
                    METRICS_FILE)
    return _LogWriter()
  return metric_writers.create_default_writer(workdir, asynchronous=True)


class MetricWriter:
  """Writes scalars to TensorBoard (and the log) and to `<workdir>/metrics.jsonl`.

  Each `write_scalars` call appends one JSON object, `{"step": s, name: value,
  ...}`, to metrics.jsonl, so a resumed run appends to the same file (call
  `drop_rows_after` first, so that the steps it repeats are not logged twice).
  Non-finite values are written as null in the JSON file (TensorBoard gets them
  as they are).
  """

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    """Opens the writers.

    Args:
      workdir: the run directory.
      enabled: whether this process writes; None means process 0 only. A
        disabled writer accepts every call and writes nothing.
    """
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._writer = None
    self._jsonl = None
    if self.enabled:
      workdir = epath.Path(workdir)
      workdir_files.make_dirs(workdir)
      _drop_torn_tail(workdir / METRICS_FILE)
      self._jsonl_path = workdir / METRICS_FILE
      self._jsonl = workdir_files.open_append(self._jsonl_path)
      self._writer = _default_writer(str(workdir))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    """Writes `scalars` ({name: scalar}) for `step`."""
    if not self.enabled:
      return
    step = int(step)
    values = {name: _to_float(value) for name, value in scalars.items()}
    self._writer.write_scalars(
        step, {name: float(np.asarray(value)) for name, value in scalars.items()})
    try:
      self._jsonl.write(json.dumps({'step': step, **values}) + '\n')
      # One line per logging interval is cheap to flush, and a killed run then
      # keeps every row it reported.
      self._jsonl.flush()
    except OSError as e:  # E.g. a full disk: the checkpoints say where a rerun resumes.
      raise workdir_files.WorkdirFileError(
          f'writing {self._jsonl_path} failed ({e.strerror or e}); free the space (or fix the cause) '
          'and rerun the same command to resume from the last checkpoint.') from e

  def flush(self):
    """Pushes buffered values to disk."""
    if self.enabled:
      self._writer.flush()
      self._jsonl.flush()

  def close(self):
    """Flushes and closes the files."""
    if self.enabled:
      self._writer.close()
      self._jsonl.close()
      self.enabled = False

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()


def _json_default(value):
  """Makes NumPy/JAX values JSON-serialisable."""
  array = np.asarray(value)
  if array.ndim == 0:
    return array.item()
  return array.tolist()


def write_summary(workdir: str, summary: Mapping[str, Any], *,
                  enabled: bool | None = None):
  """Writes `summary` (e.g. final errors, wall time) to `<workdir>/summary.json`.

  Args:
    workdir: the run directory.
    summary: JSON-serialisable values; NumPy/JAX scalars and arrays are converted.
    enabled: whether this process writes; None means process 0 only.
  """
  enabled = jax.process_index() == 0 if enabled is None else enabled
  if not enabled:
    return
  workdir = epath.Path(workdir)
  workdir_files.make_dirs(workdir)
  text = json.dumps(dict(summary), default=_json_default, sort_keys=True, indent=2)
  workdir_files.write_atomically(workdir / SUMMARY_FILE, text + '\n')


def drop_rows_after(workdir: str, step: int, *, enabled: bool | None = None):
  """Keeps only the metrics.jsonl rows of steps <= `step` (the resumed checkpoint's).

  A run resumed from checkpoint `step` recomputes and logs every later step
  again, so their earlier rows (and a torn last line) are removed first.
  """
  enabled = jax.process_index() == 0 if enabled is None else enabled
  path = epath.Path(workdir) / METRICS_FILE
  if not enabled or not path.exists():
    return
  kept = [row for row in read_rows(workdir) if row.get('step', 0) <= step]
  text = ''.join(json.dumps(row) + '\n' for row in kept)
  if text != workdir_files.read_text(path):
    workdir_files.write_atomically(path, text)


def read_summary(workdir: str) -> dict[str, Any] | None:
  """The run's previous `summary.json`, or None (absent or unreadable)."""
  path = epath.Path(workdir) / SUMMARY_FILE
  if not path.exists():
    return None
  try:
    return workdir_files.read_json_object(path)
  except workdir_files.WorkdirFileError as e:
    # Only the running total of wall time is read from it, and it is rewritten at the end.
    logging.warning('Ignoring the previous summary: %s', e)
    return None
