"""Tests for semimeta_jax.dispatch, and a preemption's latency in steps in the training loop."""

import os
import queue as queue_lib
import signal
import threading

import jax
import jax.numpy as jnp
import pytest

from configs import default
from semimeta_jax import dispatch
from semimeta_jax import errors
from semimeta_jax import methods
from semimeta_jax import parallel
from semimeta_jax import train
from semimeta_jax import validation
from semimeta_jax.data import synthetic


def _device_work(x, rounds=40):
  """A scalar that costs the device some milliseconds (dispatch returns at once)."""
  matrix = jnp.full((96, 96), 1e-3, jnp.float32) * x
  matrix = jax.lax.fori_loop(0, rounds, lambda _, m: jnp.tanh(m @ m + 1e-3), matrix)
  return jnp.sum(matrix)


_slow_step = jax.jit(lambda x: {'loss': _device_work(x), 'big': jnp.zeros((256,)) + x})


@pytest.mark.parametrize('max_in_flight', [1, 2, 3])
def test_after_each_push_at_most_max_in_flight_steps_are_unfinished(max_in_flight):
  jax.block_until_ready(_slow_step(jnp.float32(0)))
  queue = dispatch.DispatchQueue(max_in_flight)
  outputs = []
  for step in range(1, 13):
    outputs.append(_slow_step(jnp.float32(step)))
    queue.push(step, outputs[-1])
    unfinished = [i + 1 for i, out in enumerate(outputs) if not out['loss'].is_ready()]
    assert len(unfinished) <= max_in_flight, (step, unfinished)
    # Never claims a step that has not finished, and knows of all but the newest ones.
    assert all(outputs[i]['loss'].is_ready() for i in range(queue.finished_step))
    assert queue.finished_step >= step - max_in_flight
    assert queue.num_pending <= max_in_flight
  assert queue.drain() == 12 and queue.num_pending == 0
  assert all(out['loss'].is_ready() for out in outputs)


class _HeldStep:
  """A step's output that finishes only when waited on: a device far slower than the host."""

  def __init__(self):
    self.waited = False

  def is_ready(self):
    return self.waited

  def block_until_ready(self):
    self.waited = True
    return self


@pytest.mark.parametrize('max_in_flight', [1, 2, 3])
def test_the_host_runs_ahead_by_exactly_max_in_flight_steps(max_in_flight, monkeypatch):
  # The lower bound: a queue that waits one step early (depth 1 = synchronous) is caught here.
  monkeypatch.setattr(dispatch, '_smallest_leaf', lambda outputs: outputs)
  queue = dispatch.DispatchQueue(max_in_flight)
  steps = [_HeldStep() for _ in range(max_in_flight + 4)]
  for step, output in enumerate(steps, start=1):
    queue.push(step, output)
    running = sum(not s.waited for s in steps[:step])
    assert running == queue.num_pending == min(step, max_in_flight), (step, running)
    assert queue.finished_step == max(0, step - max_in_flight)
  assert queue.drain() == len(steps)


def test_the_queue_waits_on_the_smallest_output_and_mark_finished_forgets_waited_steps():
  queue = dispatch.DispatchQueue(4, start_step=10)
  assert queue.finished_step == 10
  for step in (11, 12, 13):
    queue.push(step, _slow_step(jnp.float32(step)))
  jax.block_until_ready(_slow_step(jnp.float32(0)))
  queue.mark_finished(12)
  assert queue.finished_step == 12 and queue.num_pending <= 1
  assert queue.drain() == 13


@pytest.mark.parametrize('bad', [0, -1, 1.5, None])
def test_a_queue_needs_a_positive_integer_depth(bad):
  with pytest.raises(ValueError, match='max_in_flight'):
    dispatch.DispatchQueue(bad)


@pytest.mark.parametrize('bad', [0, -2])
def test_a_bad_max_steps_in_flight_is_a_config_error(bad):
  config = default.get_config()
  config.max_steps_in_flight = bad
  with pytest.raises(errors.ConfigError, match='config.max_steps_in_flight'):
    validation.validate_config(config)


def test_a_step_without_array_outputs_is_refused():
  with pytest.raises(ValueError, match='at least one jax.Array'):
    dispatch.DispatchQueue(2).push(1, {'loss': 1.0})


class _DeviceWatcher:
  """Follows the compiled training step's calls on the devices; sends SIGTERM after step `after`.

  A thread waits on each call's step metrics in order (the host never learns
  of a step's end sooner), so when the signal is sent, step `after` has just
  finished and the devices run (at most) step `after + 1`.
  """

  def __init__(self, after: int):
    self.after = after
    self.executing_at_signal = None
    self._calls = queue_lib.Queue()
    self._count = 0
    self._thread = threading.Thread(target=self._watch, daemon=True)
    self._thread.start()

  def wrap(self, compiled_step):
    def step(state, batch):
      state, metrics = compiled_step(state, batch)
      self._count += 1
      self._calls.put((self._count, metrics['loss']))
      return state, metrics
    return step

  def _watch(self):
    while True:
      index, marker = self._calls.get()
      marker.block_until_ready()
      if index == self.after:
        self.executing_at_signal = index + 1
        os.kill(os.getpid(), signal.SIGTERM)
        return


def test_a_sigterm_is_saved_within_depth_plus_one_steps_of_the_devices(tmp_path, monkeypatch):
  depth = 2  # The default; an unbounded host saved step 17 here, 11 steps after the signal.
  synthetic.register('synthetic_dispatch', num_train=64, num_test=16, image_shape=(8, 8, 1))
  config = default.get_config()
  config.update({'method': 'supervised', 'model': 'convlarge_digits', 'model_width': 4,
                 'labeled_batch_size': 16, 'unlabeled_batch_size': 16, 'eval_batch_size': 16,
                 'warmup_steps': 0, 'lr_decay_boundaries': (), 'num_train_steps': 40,
                 'log_every_steps': 40, 'eval_every_steps': 40, 'checkpoint_every_steps': 40,
                 'max_steps_in_flight': depth})
  config.data.update({'name': 'synthetic_dispatch', 'num_labels': 20})
  # Each step made slow on the devices: dispatch returns at once, so an unbounded host would
  # queue every remaining step before it first looked at the signal's flag.
  make_train_step = methods.make_train_step

  def slow_train_step(*args, **kwargs):
    step_fn = make_train_step(*args, **kwargs)

    def step(state, batch):
      state, metrics = step_fn(state, batch)
      return state, {**metrics, 'device_work': _device_work(metrics['loss'], rounds=150)}
    return step

  watcher = _DeviceWatcher(after=5)
  jit_train_step = parallel.jit_train_step
  monkeypatch.setattr(methods, 'make_train_step', slow_train_step)
  monkeypatch.setattr(parallel, 'jit_train_step',
                      lambda *args, **kwargs: watcher.wrap(jit_train_step(*args, **kwargs)))
  # Were the signal to come after the run (a failing loop), it must not end the test process.
  late_signals = []
  previous_handler = signal.signal(signal.SIGTERM, lambda *_: late_signals.append(1))
  try:
    summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
    assert not late_signals
  finally:
    signal.signal(signal.SIGTERM, previous_handler)
  assert summary['preempted'] and not summary['completed']
  saved = summary['steps']
  assert os.listdir(tmp_path / 'run' / 'checkpoints') == [str(saved)]
  executing = watcher.executing_at_signal
  assert executing == 6
  # The step saved is at most depth + 1 steps past the one the devices ran at the signal.
  assert executing - 1 <= saved <= executing + depth + 1, (saved, executing)
