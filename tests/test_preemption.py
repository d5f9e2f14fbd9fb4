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
