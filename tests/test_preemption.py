"""Tests for semimeta_jax.preemption: SIGTERM becomes a clean stop."""

import os
import signal

from semimeta_jax import preemption


def test_sigterm_flips_should_stop_and_close_restores_handler():
  sentinel = lambda signum, frame: None
  original = signal.signal(signal.SIGTERM, sentinel)
  try:
    guard = preemption.PreemptionGuard()
    assert signal.getsignal(signal.SIGTERM) is not sentinel
    assert not guard.should_stop(0)
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.signal_received
    assert guard.should_stop(1)
    guard.close()
    assert signal.getsignal(signal.SIGTERM) is sentinel
  finally:
    signal.signal(signal.SIGTERM, original)


def test_the_stop_is_logged_against_the_step_the_devices_had_finished_at_the_signal(caplog):
  caplog.set_level('WARNING')
  finished = [4]
  original = signal.getsignal(signal.SIGTERM)
  guard = preemption.PreemptionGuard(finished_step=lambda: finished[0])
  try:
    os.kill(os.getpid(), signal.SIGTERM)
    finished[0] = 6  # Later progress does not change what the devices had done at the signal.
    assert guard.should_stop(7) and guard.should_stop(8)
  finally:
    guard.close()
  assert signal.getsignal(signal.SIGTERM) == original
  assert [r.getMessage() for r in caplog.records] == [
      'Preemption requested when the devices had finished step 4 (at least): stopping after '
      'step 7, already dispatched.']
