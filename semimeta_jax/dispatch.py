"""A bounded dispatch queue: the host runs at most a few steps ahead of the devices.

JAX dispatches a compiled step and returns at once; without a bound, the host
queues steps far ahead of the devices between two metric syncs (on a slow
device, minutes of work). Everything the host then decides (stop on a
preemption, report progress) concerns a step the devices reach much later.

`DispatchQueue` keeps a small output of each dispatched step (a scalar: the
loss, the step counter) and, once more than `max_in_flight` steps are queued,
waits until the oldest has finished. Waiting on a scalar that the step computes
costs no transfer and no sync of anything large: the wait returns when the
step's whole computation (every output of it) is done.
"""

import collections
from typing import Any

import jax


def _smallest_leaf(outputs: Any) -> jax.Array:
  """The leaf of `outputs` with the fewest elements (a scalar for the step metrics)."""
  leaves = [leaf for leaf in jax.tree.leaves(outputs) if isinstance(leaf, jax.Array)]
  if not leaves:
    raise ValueError(f'A dispatched step must return at least one jax.Array; got {outputs!r}.')
  return min(leaves, key=lambda leaf: leaf.size)


class DispatchQueue:
  """Tracks the dispatched steps still running on the devices; bounds how many.

  Call `push(step, outputs)` right after dispatching `step`. When it returns,
  at most `max_in_flight` steps are unfinished (the newest ones), so a decision
  the host takes after `push(s)` is at most `max_in_flight` steps ahead of the
  step the devices are running.

  `outputs` must not be donated to a later step (the step metrics, not the
  state): a donated buffer is gone by the time the queue waits on it.
  """

  def __init__(self, max_in_flight: int, start_step: int = 0):
    """Creates an empty queue.

    Args:
      max_in_flight: how many dispatched steps may be unfinished at once (>= 1).
      start_step: the step already finished when the run (re)starts.
    """
    if not isinstance(max_in_flight, int) or max_in_flight < 1:
      raise ValueError(f'max_in_flight must be a positive integer, got {max_in_flight!r}.')
    self.max_in_flight = max_in_flight
    self._pending: collections.deque[tuple[int, jax.Array]] = collections.deque()
    self._finished_step = start_step

  @property
  def finished_step(self) -> int:
    """The newest step known to have finished on the devices (a lower bound)."""
    return self._finished_step

  @property
  def num_pending(self) -> int:
    """How many dispatched steps are not yet known to have finished."""
    return len(self._pending)

  def _wait_oldest(self):
    step, marker = self._pending.popleft()
    marker.block_until_ready()
    self._finished_step = max(self._finished_step, step)

  def push(self, step: int, outputs: Any):
    """Records that `step` was dispatched; waits while too many steps are unfinished.

    Args:
      step: the step just dispatched (increasing from call to call).
      outputs: a pytree of the step's outputs; the queue keeps its smallest array.
    """
    self._pending.append((int(step), _smallest_leaf(outputs)))
    # Steps already done need no wait: drop them so the count is of running ones.
    while self._pending and self._pending[0][1].is_ready():
      self._wait_oldest()
    while len(self._pending) > self.max_in_flight:
      self._wait_oldest()

  def mark_finished(self, step: int):
    """Records that every step up to `step` has finished (after the caller waited for it)."""
    while self._pending and self._pending[0][0] <= step:
      self._pending.popleft()
    self._finished_step = max(self._finished_step, int(step))

  def drain(self) -> int:
    """Waits for every dispatched step; returns the newest finished step."""
    while self._pending:
      self._wait_oldest()
    return self._finished_step
