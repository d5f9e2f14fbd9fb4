"""Progress reports of a long loop (training steps, evaluation batches): compile time, rate, ETA.

A run should speak soon after it starts: once its step has compiled (how long
that took), again within the first minute with a measured rate and the time
left, then at its own cadence. The rates count units that have finished on
the devices (`dispatch.DispatchQueue.finished_step`), not units dispatched.
"""

import itertools
import math
import time
from typing import Callable

from absl import logging
import jax

from semimeta_jax import dispatch


def format_duration(seconds: float) -> str:
  """Formats seconds as hh:mm:ss (hours may exceed 24)."""
  seconds = int(round(max(seconds, 0.0)))
  return f'{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class Progress:
  """Logs how far a loop of `total` units has come, and returns rates for metric rows.

  Reports, in order: after the first unit was dispatched, how long that took
  (compilation, for a compiled step) when it took at least `quiet_seconds`;
  the first measured rate and ETA once `first_report_seconds` have passed since
  the first unit finished; then every `every_units` units (`row`) and every
  `every_seconds` seconds (`update`). A short loop with a `quiet_seconds` and
  `first_report_seconds` longer than it runs logs nothing.
  """

  def __init__(self, total: int, start: int = 0, *, title: str = 'training', unit: str = 'step',
               every_units: int | None = None, every_seconds: float | None = None,
               first_report_seconds: float = 20.0, quiet_seconds: float = 0.0,
               enabled: bool | None = None, clock: Callable[[], float] = time.monotonic):
    """Starts the clock (the first unit's dispatch, compilation included, counts from here).

    Args:
      total: the unit count at which the loop ends (e.g. `num_train_steps`).
      start: the units already done when the loop (re)starts.
      title: names the loop in the log lines.
      unit: what one unit is called ('step', 'batch').
      every_units: `row` reports when the unit count is a multiple of this (and at `total`).
      every_seconds: `update` reports when this much time has passed since the last report.
      first_report_seconds: the first rate is reported this long after the first unit finished.
      quiet_seconds: the first dispatch is reported only if it took at least this long.
      enabled: whether to log; None means process 0 only. Rates are returned either way.
      clock: the time source, in seconds.
    """
    self.total, self.start, self.title, self.unit = total, start, title, unit
    self._units = unit + ('es' if unit.endswith(('ch', 'sh', 's', 'x')) else 's')  # batch: batches.
    self.every_units, self.every_seconds = every_units, every_seconds
    self.first_report_seconds, self.quiet_seconds = first_report_seconds, quiet_seconds
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._clock = clock
    self._started = clock()
    self._dispatched_any = False
    self._anchor = None  # (units, time) when the first unit was seen finished.
    self._first_rate_reported = False
    self._last_log = None  # (units, time) of the last rate logged.
    self._last_row = None  # (units, time) of the last `row` report.

  def _log(self, done: int, rate: float, now: float):
    self._last_log = (done, now)
    if not self.enabled:
      return
    eta = (self.total - done) / rate if rate > 0 else math.inf
    logging.info('%s: %s %d/%d (%.1f%%), %.2f %s/s, ETA %s', self.title, self.unit, done,
                 self.total, 100.0 * done / max(self.total, 1), rate, self._units,
                 format_duration(eta) if math.isfinite(eta) else 'unknown')

  def update(self, dispatched: int, finished: int):
    """Records the newest unit dispatched and the newest known finished; logs when due.

    Cheap (a clock read): call it after every unit.
    """
    now = self._clock()
    if not self._dispatched_any and dispatched > self.start:
      self._dispatched_any = True
      seconds = now - self._started
      if self.enabled and seconds >= self.quiet_seconds:
        logging.info('%s: the first %s compiled and dispatched in %.1f s (%s %d of %d).',
                     self.title, self.unit, seconds, self.unit, dispatched, self.total)
    if finished <= self.start:
      return
    if self._anchor is None:
      self._anchor = (finished, now)
      return
    if not self._first_rate_reported:
      anchor_units, anchor_time = self._anchor
      if finished > anchor_units and now - anchor_time >= self.first_report_seconds:
        self._first_rate_reported = True
        self._log(finished, (finished - anchor_units) / (now - anchor_time), now)
      return
    last_units, last_time = self._last_log
    if (self.every_seconds and finished > last_units
        and now - last_time >= self.every_seconds):
      self._log(finished, (finished - last_units) / (now - last_time), now)

  def row(self, done: int) -> dict[str, float] | None:
    """After waiting for unit `done`: the rate since the previous row, when one is due.

    Due when `done` is a multiple of `every_units` or is `total`. The first due
    call only starts the interval (it returns None), so each returned rate spans
    two rows. A due call logs the unit count, the rate and the ETA.

    Returns:
      `{'steps_per_sec': rate}` (named so for every unit) or None.
    """
    done, now = int(done), self._clock()
    due = done == self.total or bool(self.every_units) and done % self.every_units == 0
    if not due or (self._last_row is not None and done <= self._last_row[0]):
      return None
    previous, self._last_row = self._last_row, (done, now)
    self._first_rate_reported = True  # A cadence report is at least as informative.
    if previous is None:
      reference = self._anchor if self._anchor and self._anchor[0] < done else None
      if reference is not None:
        self._log(done, (done - reference[0]) / max(now - reference[1], 1e-9), now)
      else:
        self._last_log = (done, now)
      return None
    rate = (done - previous[0]) / max(now - previous[1], 1e-9)
    self._log(done, rate, now)
    return {'steps_per_sec': rate}


def tracked(compiled_step: Callable, progress: Progress, max_in_flight: int) -> Callable:
  """`compiled_step` with at most `max_in_flight` calls unfinished, each reported to `progress`.

  For a loop of calls whose outputs are not donated (an evaluation pass): the
  wrapper counts calls from `progress.start + 1`.
  """
  queue = dispatch.DispatchQueue(max_in_flight, progress.start)
  counter = itertools.count(progress.start + 1)

  def step(*args, **kwargs):
    outputs = compiled_step(*args, **kwargs)
    index = next(counter)
    queue.push(index, outputs)
    progress.update(index, queue.finished_step)
    return outputs

  return step
