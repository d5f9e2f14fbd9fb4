"""Preemption: a SIGTERM (or the JAX preemption service) becomes a clean save-and-stop.

Every process must come to the same decision at the same step, or one would
save and exit while the others wait in a collective.
"""

import signal
from typing import Callable

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np


def _jax_preemption_service_available() -> bool:
  """Whether JAX's distributed runtime is up and watching for preemption notices."""
  # `jax.distributed.initialize` starts the service unless this flag is off.
  return (jax.distributed.is_initialized()
          and bool(jax.config.jax_enable_preemption_service))


# Set by the handler `remember_termination` installs: a SIGTERM that arrived
# while no guard was watching (before the loop, or during the last save).
_TERMINATION_REQUESTED = {'value': False}


def _remember(signum, frame):
  del signum, frame  # Unused.
  _TERMINATION_REQUESTED['value'] = True


def remember_termination(signals=(signal.SIGTERM,)):
  """Makes a SIGTERM outside the training loop a request that is honoured, not a kill.

  Call once, early (the command line does). Before the loop, the request is
  picked up by the `PreemptionGuard` (the run saves after its first step and
  stops); after the loop (during the last save or the summary), the run ends
  as it would have anyway. Either way the process ends with its clean message
  and exit code instead of dying by the signal with a save half written. With
  JAX's preemption service the service's own handler stays in place.
  """
  if _jax_preemption_service_available():
    return
  for sig in signals:
    signal.signal(sig, _remember)


def termination_requested() -> bool:
  """Whether a SIGTERM arrived while no `PreemptionGuard` was watching."""
  return _TERMINATION_REQUESTED['value']


class PreemptionGuard:
  """Tells the training loop, after each step, whether to save and stop.

  Single process: a SIGTERM handler sets a flag. Several processes: with JAX's
  distributed runtime, its preemption service already catches SIGTERM and picks
  a step at which all processes stop together
  (`multihost_utils.reached_preemption_sync_point`); our handler is then not
  installed, since it would replace the runtime's. Without that service, the
  local flags are combined across processes every `sync_every_steps` steps.

  Every process must call `should_stop` at every step, with the same steps.
  Create the guard in the main thread (Python only installs signal handlers there).
  """

  def __init__(self, *, signals=(signal.SIGTERM,), sync_every_steps: int = 1,
               finished_step: Callable[[], int] | None = None):
    """Installs the handlers.

    Args:
      signals: the signals that ask for a clean stop.
      sync_every_steps: with several processes and no JAX preemption service,
        how often the processes compare their flags (one small all-gather).
      finished_step: the newest step known finished on the devices
        (`dispatch.DispatchQueue.finished_step`), read when a signal arrives, so
        the stop is logged against the devices' progress, not the host's.
    """
    self._sync_every_steps = max(1, sync_every_steps)
    self._finished_step = finished_step
    self._finished_at_signal = None
    # A request made before the loop started is honoured at its first step (and consumed).
    self._received = termination_requested()
    _TERMINATION_REQUESTED['value'] = False
    self._logged = False
    self._previous_handlers = {}
    self._use_jax_service = _jax_preemption_service_available()
    if not self._use_jax_service:
      for sig in signals:
        self._previous_handlers[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del signum, frame  # Unused.
    # Only set a flag: logging here could deadlock on a lock the interrupted
    # code holds. Reading an attribute is safe.
    if self._finished_step is not None and not self._received:
      self._finished_at_signal = self._finished_step()
    self._received = True

  @property
  def signal_received(self) -> bool:
    """Whether this process received one of the signals (not agreed across processes)."""
    return self._received

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after `step`; the same answer in every process."""
    if self._use_jax_service:
      stop = multihost_utils.reached_preemption_sync_point(int(step))
    elif jax.process_count() == 1:
      stop = self._received
    elif int(step) % self._sync_every_steps:
      stop = False
    else:
      flags = multihost_utils.process_allgather(np.int32(self._received))
      stop = bool(np.max(flags))
    if stop and not self._logged:
      if self._finished_at_signal is None:
        logging.warning('Preemption requested: stopping after step %d.', step)
      else:
        logging.warning('Preemption requested when the devices had finished step %d (at '
                        'least): stopping after step %d, already dispatched.',
                        self._finished_at_signal, step)
      self._logged = True
    return stop

  def close(self):
    """Puts back the signal handlers that were in place before.

    A signal received but never acted on (it arrived after the last step's
    `should_stop`, e.g. while the final checkpoint was written) is passed on to
    `termination_requested`, so that the run's last lines say it arrived.
    """
    if self._received and not self._logged:
      _TERMINATION_REQUESTED['value'] = True
    for sig, previous in self._previous_handlers.items():
      # None means the old handler was not installed from Python and cannot be
      # reinstated; the default action is the closest match.
      signal.signal(sig, signal.SIG_DFL if previous is None else previous)
    self._previous_handlers = {}

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()
