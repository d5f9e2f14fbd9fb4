"""The command line, as a user runs it: the offline digits config, a few steps."""

import pytest
import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_main_trains_digits_from_the_command_line(tmp_path):
  workdir = tmp_path / 'digits'
  command = [sys.executable, '-m', 'semimeta_jax.main', '--config=configs/digits.py',
             f'--workdir={workdir}', f'--config.data.data_dir={tmp_path / "tfds"}',
             '--config.num_train_steps=4', '--config.eval_every_steps=4', '--config.log_every_steps=2']
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['completed'] and summary['steps'] == 4
  assert summary['num_eval_examples'] == 300  # The digits test split, every example counted.
  assert summary['num_labeled'] == 50
  environment = summary['environment']  # Where it ran: CPU results depend on the core count.
  assert environment['backend'] == 'cpu' and environment['global_devices'] == 1
  assert environment['cpu_cores'] >= 1 and environment['jax']
  assert 'test error' in result.stderr


def test_main_rejects_an_unknown_field(tmp_path):
  command = [sys.executable, '-m', 'semimeta_jax.main', '--config=configs/digits.py',
             f'--workdir={tmp_path / "run"}', '--config.hypergrad.mdoe=exact']
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert 'mdoe' in result.stderr
  assert not (tmp_path / 'run').exists()
