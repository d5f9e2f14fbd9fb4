"""One-line mistakes that used to end in a traceback: a seed out of range, a config that is a
plain dict, a workdir name that is not UTF-8 text.

The checks are tested directly (fast); one slow test runs each through the command line.
"""

import os
import pathlib
import subprocess
import sys

import pytest

from semimeta_jax import cli
from semimeta_jax import errors
from semimeta_jax import run_dir
from semimeta_jax import validation
from tests.conftest import tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]
NOT_UTF8 = os.fsdecode(b'run\xff\xfe')  # As Python reads such a name from argv.


@pytest.mark.parametrize('seed', [2**64, 2**32, -1, True])
def test_a_seed_out_of_range_names_the_valid_range(seed):
  config = tiny_config()
  config.seed = seed
  with pytest.raises(errors.ConfigError, match=r'config\.seed=.*\[0, 2\*\*32 - 1\]'):
    validation.validate_config(config)


@pytest.mark.parametrize('seed', [0, 2**32 - 1])
def test_the_ends_of_the_seed_range_are_accepted(seed):
  config = tiny_config()
  config.seed = seed
  validation.validate_config(config)


def test_a_config_that_is_a_plain_dict_is_one_line():
  with pytest.raises(errors.ConfigError, match='dict, not an ml_collections.ConfigDict'):
    validation.validate_config(tiny_config().to_dict())


def _dict_config_file(tmp_path):
  path = tmp_path / 'plain.py'
  path.write_text('def get_config():\n  return {"method": "semimeta", "seed": 0}\n')
  return path


def test_a_config_file_returning_a_plain_dict_is_one_line(tmp_path, capsys):
  path = _dict_config_file(tmp_path)
  with pytest.raises(SystemExit) as exit_info:
    cli._load_config_file(str(path))  # pylint: disable=protected-access
  assert exit_info.value.code == 2
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 1 and str(path) in lines[0] and 'returned a dict' in lines[0], lines


def test_a_workdir_name_that_is_not_utf8_is_one_line_before_anything_is_written(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.check_workdir(str(tmp_path / NOT_UTF8))
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert len(err.splitlines()) == 1 and r"run\xff\xfe" in err and 'UTF-8' in err, err
  with pytest.raises(run_dir.WorkdirError, match='not UTF-8'):
    run_dir.check_workdir_path(str(tmp_path / NOT_UTF8))
  assert os.listdir(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize('case', ['seed_too_large', 'seed_negative', 'plain_dict', 'not_utf8'])
def test_each_is_one_line_and_exit_code_2_on_the_command_line(tmp_path, case):
  workdir = os.fsencode(str(tmp_path / 'run'))
  config = b'--config=configs/digits.py'
  extra = {'seed_too_large': [b'--config.seed=18446744073709551616'],
           'seed_negative': [b'--config.seed=-1'], 'plain_dict': [], 'not_utf8': []}[case]
  if case == 'plain_dict':
    config = b'--config=' + os.fsencode(str(_dict_config_file(tmp_path)))
  if case == 'not_utf8':
    workdir += b'\xff'
  command = [os.fsencode(sys.executable), b'-m', b'semimeta_jax.main', config,
             b'--workdir=' + workdir, *extra]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  errors_shown = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors_shown) == 1, result.stderr
  assert not any(name.startswith('run') for name in os.listdir(tmp_path)), os.listdir(tmp_path)
