"""Tests for semimeta_jax.progress: when a long loop reports, and the rates and ETAs it gives."""

import jax
import jax.numpy as jnp
import pytest

from semimeta_jax import progress as progress_lib


class _FakeClock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def _messages(caplog):
  return [record.getMessage() for record in caplog.records]


def test_training_reports_compile_time_then_a_first_rate_then_every_n_steps(caplog):
  caplog.set_level('INFO')
  clock = _FakeClock()
  progress = progress_lib.Progress(1000, every_units=100, first_report_seconds=20.0,
                                   enabled=True, clock=clock)
  rows = {}
  for step in range(1, 301):
    # The first call compiles (40 s); then 2 s a step, the devices two steps behind the host.
    clock.now += 40.0 if step == 1 else 2.0
    progress.update(step, finished=step - 2)
    if step % 100 == 0:
      rows[step] = progress.row(step)
  messages = _messages(caplog)
  assert messages[0] == ('training: the first step compiled and dispatched in 40.0 s '
                         '(step 1 of 1000).')
  # Step 1 is seen finished at step 3 (t = 144 s); 20 s later 10 more steps have: 0.5 steps/s.
  assert messages[1] == 'training: step 11/1000 (1.1%), 0.50 steps/s, ETA 00:32:58'
  # Then at the cadence. A row's step comes after a wait for the devices; the first row's rate
  # counts from step 1's first sighting at t = 144 s: 99 steps in 194 s.
  expected = {100: 99 / 194, 200: 0.5, 300: 0.5}
  assert messages[2:] == [
      f'training: step {s}/1000 ({s / 10:.1f}%), {rate:.2f} steps/s, ETA '
      f'{progress_lib.format_duration((1000 - s) / rate)}' for s, rate in expected.items()]
  # Metric rows: the first only starts the interval, as each rate spans two rows.
  assert rows[100] is None
  assert rows[200] == {'steps_per_sec': pytest.approx(0.5)}
  assert rows[300] == {'steps_per_sec': pytest.approx(0.5)}


def test_a_first_rate_within_the_first_minute_even_when_a_step_is_slow(caplog):
  caplog.set_level('INFO')
  clock = _FakeClock()
  progress = progress_lib.Progress(20000, every_units=100, enabled=True, clock=clock)
  step, reported_at = 0, None
  while reported_at is None:
    step += 1
    clock.now += 30.0 if step == 1 else 6.0  # The image-folder preset on two CPU cores.
    progress.update(step, finished=step - 2)
    if len(caplog.records) == 2:
      reported_at = clock.now
  assert reported_at - 100.0 - 30.0 <= 60.0  # Within a minute of the end of compilation.
  assert 'steps/s, ETA' in caplog.records[1].getMessage()
  assert '0.17 steps/s' in caplog.records[1].getMessage()


def test_a_short_evaluation_says_nothing_and_a_long_one_reports_every_minute(caplog):
  caplog.set_level('INFO')
  clock = _FakeClock()
  short = progress_lib.Progress(10, title='eval', unit='batch', every_seconds=60.0,
                                quiet_seconds=20.0, enabled=True, clock=clock)
  for batch in range(1, 11):
    clock.now += 1.0
    short.update(batch, finished=batch - 1)
  assert not caplog.records
  long = progress_lib.Progress(100, title='eval', unit='batch', every_seconds=60.0,
                               quiet_seconds=20.0, enabled=True, clock=clock)
  for batch in range(1, 101):
    clock.now += 25.0 if batch == 1 else 2.0
    long.update(batch, finished=batch - 1)
  messages = _messages(caplog)
  assert messages[0] == 'eval: the first batch compiled and dispatched in 25.0 s (batch 1 of 100).'
  assert messages[1] == 'eval: batch 11/100 (11.0%), 0.50 batches/s, ETA 00:02:58'
  assert [m.split(',')[0] for m in messages[2:]] == ['eval: batch 41/100 (41.0%)',
                                                     'eval: batch 71/100 (71.0%)']


def test_a_resumed_run_counts_from_its_start_and_a_disabled_one_logs_nothing(caplog):
  caplog.set_level('INFO')
  clock = _FakeClock()
  progress = progress_lib.Progress(50, start=40, every_units=5, enabled=False, clock=clock)
  rates = []
  for step in range(41, 51):
    clock.now += 0.25
    progress.update(step, finished=step - 1)
    rates.append(progress.row(step))
  assert not caplog.records
  assert rates[4] is None and rates[9] == {'steps_per_sec': pytest.approx(4.0)}


def test_tracked_calls_keep_at_most_max_in_flight_unfinished_and_report_each():
  calls = []

  class _Recorder(progress_lib.Progress):

    def update(self, dispatched, finished):
      calls.append((dispatched, finished))

  work = jax.jit(lambda x: jax.lax.fori_loop(0, 30, lambda _, m: jnp.tanh(m @ m), x).sum())
  matrix = jnp.ones((64, 64)) * 1e-3
  work(matrix).block_until_ready()
  step = progress_lib.tracked(work, _Recorder(8, title='eval', unit='batch', every_seconds=1.0),
                              max_in_flight=2)
  outputs = [step(matrix) for _ in range(8)]
  assert [dispatched for dispatched, _ in calls] == list(range(1, 9))
  for dispatched, finished in calls:
    assert dispatched - 2 <= finished <= dispatched
  assert all(out.is_ready() for out in outputs[:6])


@pytest.mark.parametrize('seconds,text', [(0, '00:00:00'), (3723.4, '01:02:03'),
                                          (90061, '25:01:01')])
def test_format_duration(seconds, text):
  assert progress_lib.format_duration(seconds) == text
