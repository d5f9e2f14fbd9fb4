"""Tests for semimeta_jax.run_dir: the workdir argument, the config record and the resume policy."""

import json

import ml_collections
import pytest

from semimeta_jax import errors
from semimeta_jax import run_dir


def _config(**overrides):
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.num_train_steps = 100
  config.log_every_steps = 10
  config.allow_config_change = False
  config.learning_rate = 0.1
  config.lr_schedule = 'step'
  config.lr_decay_boundaries = (30, 60)
  config.data = ml_collections.ConfigDict()
  config.data.name = 'digits'
  config.data.num_labels = 50
  config.data.data_dir = None
  config.hypergrad = ml_collections.ConfigDict()
  config.hypergrad.mode = 'jvp'
  for name, value in overrides.items():
    target = config
    *parents, leaf = name.split('.')
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def _files(path):
  return sorted(p.name for p in path.iterdir())


@pytest.mark.parametrize('workdir', ['', '  ', None])
def test_an_empty_workdir_is_refused(workdir):
  with pytest.raises(run_dir.WorkdirError, match='--workdir is empty'):
    run_dir.check_workdir_path(workdir)


def test_free_fields_resume_and_each_change_is_kept_as_config_step_json(tmp_path):
  config = _config()
  assert run_dir.check_config(tmp_path, config) == {}  # No record yet.
  run_dir.record_config(tmp_path, config, 0)
  first = (tmp_path / 'config.json').read_text()
  run_dir.record_config(tmp_path, config, 40)  # Unchanged: nothing new is written.
  assert _files(tmp_path) == ['config.json']
  # Cadence, data location and (with the step schedule) the run length change nothing computed.
  longer = _config(num_train_steps=500, log_every_steps=1, **{'data.data_dir': '/elsewhere'})
  assert run_dir.check_config(tmp_path, longer) == {}
  run_dir.record_config(tmp_path, longer, 100)
  assert json.loads((tmp_path / 'config.json').read_text())['num_train_steps'] == 500
  assert (tmp_path / 'config.100.json').read_text() == first


def test_a_changed_field_is_refused_unless_allowed_and_the_check_writes_nothing(tmp_path):
  run_dir.record_config(tmp_path, _config(), 0)
  before = (tmp_path / 'config.json').read_text()
  changed = _config(learning_rate=0.01, **{'hypergrad.mode': 'exact'})
  with pytest.raises(run_dir.ConfigChangedError) as error:
    run_dir.check_config(tmp_path, changed)
  message = str(error.value)
  assert isinstance(error.value, errors.UserError)
  assert 'hypergrad.mode' in message and 'learning_rate' in message and '\n' not in message
  assert 'allow_config_change=True' in message and 'seed' not in message
  assert (tmp_path / 'config.json').read_text() == before and _files(tmp_path) == ['config.json']

  changed.allow_config_change = True
  differences = run_dir.check_config(tmp_path, changed)
  assert differences == {'hypergrad.mode': ('jvp', 'exact'), 'learning_rate': (0.1, 0.01)}
  assert _files(tmp_path) == ['config.json']  # Checking never writes.
  run_dir.record_config(tmp_path, changed, 30)
  assert (tmp_path / 'config.30.json').read_text() == before
  # The new config is the reference now, so the same command resumes without the flag.
  changed.allow_config_change = False
  assert run_dir.check_config(tmp_path, changed) == {}


@pytest.mark.parametrize('field, value', [('seed', 1), ('data.num_labels', 100), ('data.name', 'cifar10')])
def test_fixed_fields_are_refused_even_with_allow_config_change(tmp_path, field, value):
  run_dir.record_config(tmp_path, _config(), 0)
  changed = _config(allow_config_change=True, **{field: value})
  with pytest.raises(run_dir.ConfigChangedError, match=f'another {field} .*never change'):
    run_dir.check_config(tmp_path, changed)
  assert _files(tmp_path) == ['config.json']


def test_the_cosine_schedule_length_needs_allow_config_change(tmp_path):
  run_dir.record_config(tmp_path, _config(lr_schedule='cosine'), 0)
  with pytest.raises(run_dir.ConfigChangedError, match='num_train_steps: saved 100, now 200'):
    run_dir.check_config(tmp_path, _config(lr_schedule='cosine', num_train_steps=200))
  allowed = _config(lr_schedule='cosine', num_train_steps=200, allow_config_change=True)
  assert run_dir.check_config(tmp_path, allowed) == {'num_train_steps': (100, 200)}


def test_a_new_field_counts_as_a_change(tmp_path):
  run_dir.record_config(tmp_path, _config(), 0)
  extended = _config()
  extended.brand_new_field = True
  with pytest.raises(run_dir.ConfigChangedError, match='brand_new_field'):
    run_dir.check_config(tmp_path, extended)


def test_resuming_past_the_run_length_is_refused():
  run_dir.check_run_length('w', 100, 100)  # A finished run started again: fine.
  with pytest.raises(run_dir.ConfigChangedError, match=r'already at step 300.*num_train_steps=300'):
    run_dir.check_run_length('w', 300, 100)
