"""The command line as a user meets it: help, one-line errors for mistakes, the dry run, a rerun."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_main(*args, timeout=300):
  command = [sys.executable, '-m', 'semimeta_jax.main', *args]
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def error_message(stderr: str) -> list[str]:
  """The lines of the `error: ...` message (absl INFO lines before it are not part of it)."""
  lines = stderr.splitlines()
  starts = [i for i, line in enumerate(lines) if line.startswith('error: ')]
  assert starts, stderr[-2000:]
  return lines[starts[-1]:]


def assert_one_clear_error(result, *names, workdir=None):
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  message = error_message(result.stderr)
  assert len(message) <= 3, message
  for name in names:
    assert name in '\n'.join(message), (name, message)
  if workdir is not None:
    assert not workdir.exists() or not any(workdir.iterdir()), list(workdir.iterdir())


def test_help_exits_zero_and_says_how_fields_are_listed_and_overridden():
  result = run_main('--help', timeout=60)
  assert result.returncode == 0, result.stderr
  assert '--config.FIELD=VALUE' in result.stdout
  assert '--dry_run' in result.stdout
  assert '--workdir' in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize('args,names', [
    (['--config.hypergrad.mode=exactt'], ['hypergrad.mode', 'exactt']),
    (['--config.hypergrad.modee=exact'], ["'hypergrad.modee'", "did you mean 'hypergrad.mode'"]),
    (['--config.seed=abc'], ['config.seed', 'abc']),
    (['--config.learning_rate=-1'], ['learning_rate']),
    (['--config.data.name=nope'], ['data.name', 'nope']),
    # A field's earlier flat name: the error names today's field.
    (['--config.vat_epsilon=2.0'], ["'vat_epsilon'", "did you mean 'vat.epsilon'"]),
])
def test_a_bad_field_is_one_line_and_nothing_is_written(tmp_path, args, names):
  workdir = tmp_path / 'run'
  result = run_main('--config=configs/digits.py', f'--workdir={workdir}', *args)
  assert_one_clear_error(result, *names, workdir=workdir)


@pytest.mark.slow
def test_a_preset_runs_its_method_and_an_unknown_one_is_named(tmp_path):
  workdir = tmp_path / 'run'
  result = run_main('--config=configs/digits.py:vat_ent', f'--workdir={workdir}', '--dry_run',
                    '--config.vat.epsilon=3.0')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'method        vat' in result.stdout
  assert 'entropy_weight: 1.0' in result.stdout and 'epsilon: 3.0' in result.stdout  # Overrides follow.
  assert not workdir.exists()
  result = run_main('--config=configs/digits.py:vat_entropy', f'--workdir={workdir}')
  assert_one_clear_error(result, "'vat_entropy'", 'vat_ent', workdir=workdir)


def test_a_missing_config_file_names_it_and_the_configs_there(tmp_path):
  workdir = tmp_path / 'run'
  result = run_main('--config=configs/nope.py', f'--workdir={workdir}')
  assert_one_clear_error(result, 'configs/nope.py', 'digits.py', workdir=workdir)


@pytest.mark.slow
@pytest.mark.parametrize('workdir_flag', ['--workdir=', '--workdir=   ', None])
def test_an_empty_or_missing_workdir_is_refused(tmp_path, workdir_flag):
  args = [f'--config={REPO / "configs" / "digits.py"}'] + ([workdir_flag] if workdir_flag else [])
  result = subprocess.run([sys.executable, '-m', 'semimeta_jax.main', *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env={'PYTHONPATH': str(REPO), 'PATH': '/usr/bin:/bin'})
  # Run from tmp_path, so training into "the current directory" would show up there.
  assert_one_clear_error(result, '--workdir', workdir=tmp_path)


@pytest.mark.slow
def test_a_workdir_that_is_a_file_is_refused(tmp_path):
  path = tmp_path / 'file'
  path.write_text('not a directory')
  result = run_main('--config=configs/digits.py', f'--workdir={path}')
  assert_one_clear_error(result, str(path))
  assert path.read_text() == 'not a directory'


@pytest.mark.slow
def test_a_missing_dataset_names_it_where_it_looked_and_the_fix(tmp_path):
  workdir = tmp_path / 'run'
  data_dir = tmp_path / 'tfds'
  result = run_main('--config=configs/cifar10.py', f'--workdir={workdir}',
                    f'--config.data.data_dir={data_dir}')
  assert_one_clear_error(result, "'cifar10'", str(data_dir), 'python -m semimeta_jax.prepare cifar10',
                         workdir=workdir)


@pytest.mark.slow
def test_dry_run_prints_the_config_and_plan_and_writes_nothing(tmp_path):
  workdir, data_dir = tmp_path / 'run', tmp_path / 'tfds'
  result = run_main('--config=configs/digits.py', f'--workdir={workdir}',
                    f'--config.data.data_dir={data_dir}', '--config.num_train_steps=300', '--dry_run')
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert 'num_train_steps: 300' in out  # The resolved config, overrides applied.
  # 300 steps x 64 labeled over 50 labels = 384 epochs; x 64 unlabeled over 1447 = 13.3.
  assert 'labeled       50 examples, batch 64: 384.0 epochs' in out
  assert 'unlabeled     1447 examples, batch 64: 13.3 epochs' in out
  assert 'devices       1 x cpu' in out
  assert f'workdir       {workdir}: new' in out
  assert not workdir.exists() and not data_dir.exists()


@pytest.mark.slow
def test_a_finished_run_started_again_logs_nothing_twice_and_keeps_the_total_time(tmp_path):
  workdir = tmp_path / 'digits'
  args = ['--config=configs/digits.py', f'--workdir={workdir}', f'--config.data.data_dir={tmp_path / "tfds"}',
          '--config.num_train_steps=4', '--config.eval_every_steps=4', '--config.log_every_steps=2',
          '--config.checkpoint_every_steps=4']
  first = run_main(*args, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  rows_before = (workdir / 'metrics.jsonl').read_text()
  events_before = sorted(p.name for p in workdir.glob('events.out.tfevents.*'))
  total_before = json.loads((workdir / 'summary.json').read_text())['wall_seconds_total']

  again = run_main(*args, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert (workdir / 'metrics.jsonl').read_text() == rows_before
  steps = [(row['step'], tuple(sorted(row))) for row in map(json.loads, rows_before.splitlines())]
  assert len(steps) == len(set(steps))  # No (step, metrics) row twice.
  assert sorted(p.name for p in workdir.glob('events.out.tfevents.*')) == events_before
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['completed'] and summary['steps'] == 4
  assert summary['wall_seconds_total'] == pytest.approx(total_before + summary['wall_seconds_this_run'])
  # The last lines say what happened and where to look.
  assert 'Final test error' in again.stdout
  assert str(workdir / 'summary.json') in again.stdout
  assert f'tensorboard --logdir={workdir}' in again.stdout
