"""Multi-process training: two `jax.distributed` processes on localhost.

Runs the real training loop (`train.train_and_evaluate`, mock CIFAR-10, a tiny
ConvLarge) as separate processes started from here (`multiprocess_worker.py`):

  * pair: 2 processes x 2 CPU devices, one shared workdir;
  * single: 1 process x 4 CPU devices, the same config, its own workdir;
  * restore: 1 process x 4 devices restoring the pair's last checkpoint;
  * preempted: another pair, one of whose processes gets a SIGTERM mid-run.

The input pipeline gives every process its own rows of the same global batch,
so the pair and the single process must compute the same steps.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

# Every test here starts processes (the pair fixture): the slow tier.
pytestmark = pytest.mark.slow

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORKER = os.path.join(_REPO, 'tests', 'multiprocess_worker.py')
_NUM_STEPS = 4
# Long enough that the SIGTERM always lands mid-run, short enough to end soon if it were ignored.
_PREEMPTED_RUN_STEPS = 200
_TIMEOUT_S = 420
_LOG_TAIL_CHARS = 3000


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _worker_env() -> dict[str, str]:
  env = dict(os.environ)
  # Unoptimised XLA code compiles several times faster, and every run here
  # compiles the same programs with the same flags, so the comparisons hold.
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0').strip()
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'
  # The worker imports `configs` and `semimeta_jax` from this checkout.
  env['PYTHONPATH'] = os.pathsep.join(filter(None, (_REPO, env.get('PYTHONPATH'))))
  return env


class _Workers:
  """Worker processes started by one test module, with their logs."""

  def __init__(self, root):
    self.root = root
    self.procs: dict[str, subprocess.Popen] = {}
    self.logs: dict[str, str] = {}

  def out(self, name: str) -> str:
    return os.path.join(self.root, 'out', name)

  def start(self, name, mode, workdir, num_devices, *, num_train_steps=_NUM_STEPS,
            coordinator=None, num_processes=1, process_id=0):
    """Starts one worker; its stdout and stderr go to `<root>/out/<name>.log`."""
    os.makedirs(os.path.join(self.root, 'out'), exist_ok=True)
    args = [sys.executable, _WORKER, mode, '--workdir', workdir, '--out', self.out(name),
            '--num_devices', str(num_devices), '--num_train_steps', str(num_train_steps)]
    if coordinator:
      args += ['--coordinator_address', coordinator, '--num_processes', str(num_processes),
               '--process_id', str(process_id)]
    self.logs[name] = self.out(name) + '.log'
    with open(self.logs[name], 'w') as log:
      self.procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                          env=_worker_env())

  def start_pair(self, name, workdir, num_train_steps=_NUM_STEPS):
    """Starts processes `<name>0` and `<name>1` of a two-process run."""
    coordinator = f'localhost:{_free_port()}'
    for i in range(2):
      self.start(f'{name}{i}', 'train', workdir, 2, num_train_steps=num_train_steps,
                 coordinator=coordinator, num_processes=2, process_id=i)

  def _tails(self, names) -> str:
    parts = []
    for name in names:
      with open(self.logs[name], errors='replace') as f:
        text = f.read()
      parts.append(f'----- {name} (exit code {self.procs[name].poll()}), last lines:\n'
                   f'{text[-_LOG_TAIL_CHARS:]}')
    return '\n'.join(parts)

  def wait(self, deadline, on_tick=None):
    """Waits for every started worker; on a failure or the deadline, kills the rest and fails.

    Args:
      deadline: `time.monotonic()` value to give up at.
      on_tick: called every poll while workers run (e.g. to send a signal).
    """
    while True:
      codes = {name: proc.poll() for name, proc in self.procs.items()}
      failed = [name for name, code in codes.items() if code not in (None, 0)]
      timed_out = time.monotonic() > deadline
      if failed or timed_out:
        self.kill()
        reason = f'workers {failed} failed' if failed else f'timed out after {_TIMEOUT_S} s'
        pytest.fail(f'Multi-process run: {reason}.\n{self._tails(self.procs)}')
      if all(code == 0 for code in codes.values()):
        return
      if on_tick is not None:
        on_tick()
      time.sleep(0.2)

  def kill(self):
    for proc in self.procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()

  def result(self, name) -> tuple[dict, dict[str, np.ndarray]]:
    """(record, {leaf path: [local devices, ...] array}) that worker `name` wrote."""
    with open(self.out(name) + '.json') as f:
      record = json.load(f)
    with np.load(self.out(name) + '.npz') as arrays:
      return record, dict(arrays)


def _metrics_rows(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith('\n')]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Runs every worker once for the whole module; returns the workdirs and the workers."""
  root = str(tmp_path_factory.mktemp('multiprocess'))
  workdirs = {name: os.path.join(root, name) for name in ('pair', 'single', 'preempted')}
  workers = _Workers(root)
  deadline = time.monotonic() + _TIMEOUT_S
  try:
    workers.start_pair('pair', workdirs['pair'])
    workers.start('single', 'train', workdirs['single'], 4)
    workers.start_pair('preempted', workdirs['preempted'], _PREEMPTED_RUN_STEPS)
    signalled = []

    def preempt_once_training():
      # A metrics row means process 0 finished a step: both are in the loop.
      if not signalled and _metrics_rows(workdirs['preempted']):
        workers.procs['preempted1'].send_signal(signal.SIGTERM)
        signalled.append(time.monotonic())

    workers.wait(deadline, on_tick=preempt_once_training)
    workers.start('restore', 'restore', workdirs['pair'], 4)
    workers.wait(deadline)
  finally:
    workers.kill()
  return workdirs, workers


def _assert_trees_equal(expected, actual, index=0):
  assert sorted(expected) == sorted(actual)
  for path in expected:
    np.testing.assert_array_equal(actual[path][index], expected[path][0], err_msg=path)


@pytest.mark.slow
def test_pair_completes_into_one_shared_workdir(runs):
  workdirs, workers = runs
  for i in range(2):
    record, _ = workers.result(f'pair{i}')
    assert record['process_index'] == i
    assert (record['process_count'], record['device_count'], record['local_device_count']) == (2, 4, 2)
    assert record['saved_steps'] == [_NUM_STEPS]
    assert record['summary']['completed'] and record['summary']['steps'] == _NUM_STEPS
  assert os.listdir(os.path.join(workdirs['pair'], 'checkpoints')) == [str(_NUM_STEPS)]
  # Only process 0 writes metrics: one row per logged step, not one per process.
  train_steps = [row['step'] for row in _metrics_rows(workdirs['pair']) if 'train/loss' in row]
  assert train_steps == list(range(1, _NUM_STEPS + 1))
  with open(os.path.join(workdirs['pair'], 'summary.json')) as f:
    assert json.load(f)['steps'] == _NUM_STEPS


def test_pair_holds_identical_replicas(runs):
  _, workers = runs
  _, first = workers.result('pair0')
  _, second = workers.result('pair1')
  assert 'params/head/fc/kernel' in first
  # Every device of both processes holds the same copy of every state leaf.
  for copies in (first, second):
    for index in range(2):
      _assert_trees_equal(first, copies, index)


def test_the_device_made_batch_is_the_same_from_one_and_two_processes(runs):
  _, workers = runs
  batches = []
  for name in ('pair0', 'pair1', 'single'):
    with np.load(workers.out(name) + '.batch2.npz') as arrays:
      batches.append(dict(arrays))
  single = batches[2]
  assert sorted(single) == ['labeled/image', 'labeled/index', 'labeled/label',
                            'unlabeled/image', 'unlabeled/index', 'unlabeled/label']
  assert single['labeled/image'].shape == (8, 32, 32, 3) and single['labeled/image'].std() > 0.1
  for pair in batches[:2]:
    assert sorted(pair) == sorted(single)
    for key, value in single.items():
      np.testing.assert_array_equal(pair[key], value, err_msg=key)


def test_pair_matches_one_process_with_four_devices(runs):
  _, workers = runs
  pair_record, pair = workers.result('pair0')
  single_record, single = workers.result('single')
  assert (single_record['process_count'], single_record['device_count']) == (1, 4)
  assert sorted(pair) == sorted(single)
  for path in pair:
    # Same global batches, same program, only the devices' placement differs.
    np.testing.assert_allclose(pair[path][0], single[path][0], rtol=1e-5, atol=1e-6, err_msg=path)
  for path in ('step', 'rng', 'opt_state/1/1/count'):
    np.testing.assert_array_equal(pair[path][0], single[path][0], err_msg=path)
  assert pair_record['summary'] == single_record['summary']


def test_pair_checkpoint_restores_in_one_process(runs):
  _, workers = runs
  restored_record, restored = workers.result('restore')
  _, pair = workers.result('pair0')
  assert restored_record['restored_step'] == _NUM_STEPS
  assert (restored_record['process_count'], restored_record['local_device_count']) == (1, 4)
  for index in range(4):
    _assert_trees_equal(pair, restored, index)


def test_sigterm_to_one_process_stops_both_at_the_same_step(runs):
  workdirs, workers = runs
  records = [workers.result(f'preempted{i}')[0] for i in range(2)]
  stop_steps = {r['summary']['steps'] for r in records}
  assert len(stop_steps) == 1, records
  stop_step = stop_steps.pop()
  assert 1 <= stop_step < _PREEMPTED_RUN_STEPS
  for record in records:
    assert record['summary']['preempted'] and not record['summary']['completed']
    assert record['saved_steps'] == [stop_step]
  assert os.listdir(os.path.join(workdirs['preempted'], 'checkpoints')) == [str(stop_step)]
