"""Faults as a user meets them on the command line: the exit code, the lines on the terminal.

Each runs `python -m semimeta_jax.main` (through tests/fault_injection_main.py
where a fault must be injected inside the process) on the offline digits config.
"""

import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.fault_helpers import outside_files
from tests.fault_helpers import small_filesystem
from tests.fault_helpers import tree_fingerprint

REPO = pathlib.Path(__file__).resolve().parents[1]
# A few lines: the run's own INFO lines (devices, dataset, progress, evaluation) and its one message.
MAX_TERMINAL_LINES = 15


def run_with_fault(fault, workdir, tmp_path, *extra, timeout=600):
  args = ['--config=configs/digits.py', f'--workdir={workdir}',
          f'--config.data.data_dir={tmp_path / "tfds"}', '--config.num_train_steps=4',
          '--config.checkpoint_every_steps=2', '--config.eval_every_steps=4',
          '--config.log_every_steps=2', *extra]
  command = [sys.executable, '-m', 'tests.fault_injection_main', fault, *args]
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def assert_few_lines_no_traceback(result):
  lines = result.stderr.splitlines()
  assert 'Traceback' not in result.stderr, result.stderr[-5000:]
  assert len(lines) <= MAX_TERMINAL_LINES, '\n'.join(lines)


def assert_one_error_line(result, *names):
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  assert_few_lines_no_traceback(result)
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1, result.stderr
  for name in names:
    assert name in errors[0], (name, errors[0])


def _bytes_on_tmpfs(paths) -> int:
  """What the files take on a tmpfs: whole 4 KiB pages each."""
  return sum(-(-path.stat().st_size // 4096) * 4096 for path in paths if path.is_file())


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """A 4-step digits run with checkpoints at steps 2 and 4 (the data set built once for all)."""
  tmp_path = tmp_path_factory.mktemp('faults_cli')
  result = run_with_fault('none', tmp_path / 'run', tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  return tmp_path


def _workdir_with(tmp_path, name, content):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  path = workdir / name
  if content is None:
    path.mkdir()
  else:
    path.write_bytes(content)
  return workdir, path


@pytest.mark.slow
@pytest.mark.parametrize('name, content, expected', [
    ('config.json', b'\xff\xfe', 'UTF-8'),
    ('config.json', b'"a string"', 'not an object'),
    ('metrics.jsonl', None, 'not a regular file'),
    ('labeled_indices.json', b'[]', 'not an object'),
])
def test_a_damaged_record_is_one_line_and_exit_code_2(finished_run, tmp_path, name, content,
                                                       expected):
  workdir, path = _workdir_with(tmp_path, name, content)
  before = tree_fingerprint(workdir)
  result = run_with_fault('none', workdir, finished_run)  # Its data set, built once.
  assert_one_error_line(result, str(path), expected)
  assert tree_fingerprint(workdir) == before


@pytest.mark.slow
def test_a_workdir_that_cannot_be_created_is_one_line_and_exit_code_2(finished_run):
  result = run_with_fault('none', '/proc/semimeta_run', finished_run)
  assert_one_error_line(result, '/proc/semimeta_run')


@pytest.mark.slow
def test_a_workdir_seeded_with_links_out_leaves_their_targets_untouched(finished_run, tmp_path):
  elsewhere = outside_files(tmp_path)
  before = tree_fingerprint(elsewhere)
  workdir = tmp_path / 'run'
  workdir.mkdir()
  for name in ('LOCK', 'summary.json', 'metrics.jsonl.tmp'):
    os.symlink(elsewhere / name, workdir / name)
  seeded = tree_fingerprint(workdir)
  result = run_with_fault('none', workdir, finished_run)
  assert_one_error_line(result, 'symbolic link', str(workdir))
  assert tree_fingerprint(elsewhere) == before
  assert tree_fingerprint(workdir) == seeded


@pytest.mark.slow
def test_a_damaged_checkpoint_falls_back_with_a_few_lines_on_the_terminal(finished_run, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(finished_run / 'run', workdir)
  for path in (workdir / 'checkpoints' / '4' / 'state').rglob('*'):
    if path.parent.name == 'd':  # Every array data file, sizes kept.
      with open(path, 'r+b') as f:
        f.seek(path.stat().st_size // 2)
        f.write(np.random.default_rng(0).bytes(64))
  result = run_with_fault('none', workdir, finished_run)
  assert result.returncode == 0, result.stderr[-3000:]
  assert_few_lines_no_traceback(result)
  assert 'Checkpoint 4 is unusable' in result.stderr
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4', 'corrupt.4']


@pytest.mark.slow
def test_a_full_disk_is_one_line_with_its_cause(finished_run, tmp_path):
  workdir = tmp_path / 'run'
  result = run_with_fault('no_space', workdir, finished_run)
  assert_one_error_line(result, 'Saving checkpoint 2', 'No space left on device')


@pytest.mark.slow
def test_a_save_into_a_planted_link_ends_the_process_promptly_with_the_lock_released(
    finished_run, tmp_path, monkeypatch):
  elsewhere = outside_files(tmp_path)
  before = tree_fingerprint(elsewhere)
  monkeypatch.setenv('SEMIMETA_OUTSIDE_DIR', str(elsewhere))
  workdir = tmp_path / 'run'
  # The run itself takes under a minute; a process kept alive by orbax's threads took 5.
  result = run_with_fault('tmp_link_out', workdir, finished_run, timeout=200)
  assert_one_error_line(result, 'Saving checkpoint 4', 'symbolic link', 'checkpoint 2 is intact')
  assert tree_fingerprint(elsewhere) == before
  assert not (workdir / 'LOCK').exists()
  assert (workdir / 'checkpoints' / '2').is_dir()


@pytest.mark.slow
def test_a_really_full_disk_is_one_line_with_the_system_s_reason(finished_run, tmp_path):
  # A file system that holds checkpoint 2 and the records, and half of checkpoint 4 beside them,
  # sized from the finished run's own files (a fixed size sat on the edge as checkpoints changed).
  run = finished_run / 'run'
  records = _bytes_on_tmpfs(path for path in run.rglob('*') if 'checkpoints' not in path.parts)
  checkpoint_2 = _bytes_on_tmpfs((run / 'checkpoints' / '2').rglob('*'))
  checkpoint_4 = _bytes_on_tmpfs((run / 'checkpoints' / '4').rglob('*'))
  size_kb = (records + checkpoint_2 + checkpoint_4 // 2) // 1024
  with small_filesystem(tmp_path / 'disk', f'{size_kb}k') as disk:
    result = run_with_fault('none', disk / 'run', finished_run)
    assert_one_error_line(result, 'Saving checkpoint 4', 'failed: No space left on device (',
                          'checkpoint 2 is intact')
    assert (disk / 'run' / 'checkpoints' / '2').is_dir()


@pytest.mark.slow
@pytest.mark.parametrize('fault, outcome, steps', [
    ('sigterm_in_final_save', 'Run finished at step 4.', ['2', '4']),
    ('sigterm_in_last_save', 'Run finished at step 4.', ['2', '4']),
    ('sigterm_before_training', 'Run stopped after a preemption request at step 1.', ['1']),
])
def test_a_sigterm_at_any_moment_ends_cleanly(finished_run, tmp_path, fault, outcome, steps):
  workdir = tmp_path / 'run'
  result = run_with_fault(fault, workdir, finished_run)
  assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
  assert_few_lines_no_traceback(result)
  assert outcome in result.stdout, result.stdout
  if 'finished' in outcome:  # The signal is said, not lost, though the run went on to its end.
    assert 'A stop request (SIGTERM) arrived' in result.stdout, result.stdout
  assert sorted(os.listdir(workdir / 'checkpoints')) == steps  # No unfinished save left.


@pytest.mark.slow
def test_the_advice_after_a_divergence_rescues_the_run(finished_run, tmp_path):
  workdir = tmp_path / 'run'
  too_large = ('--config.learning_rate=1e4', '--config.warmup_steps=0')  # Diverges at once.
  result = run_with_fault('none', workdir, finished_run, *too_large)
  assert_one_error_line(result, 'non-finite', 'orders of magnitude')
  advice = result.stderr.split('rerun the same command with', 1)[1].split(' added', 1)[0].split()
  assert advice[0] == '--config.allow_config_change=True'
  assert advice[1].startswith('--config.learning_rate=')
  rescued = run_with_fault('none', workdir, finished_run, *too_large, *advice)
  assert rescued.returncode == 0, rescued.stderr[-3000:]
  assert 'Run finished at step 4.' in rescued.stdout
