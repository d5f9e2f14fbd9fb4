"""A run directory written before the method fields moved into blocks still resumes.

tests/data/run_before_method_blocks/ is a 2-step supervised digits run (config.json
with the earlier flat names, its split and its checkpoint at step 2) written by the
version before methods owned their config blocks; tests/data/config_before_method_blocks_mean_teacher.json
is the config.json of a Mean Teacher + fast-SWA run of that version, with non-default
values in renamed fields.
"""

import json
import logging
import pathlib
import shutil

import pytest

from configs import default
from configs import digits
from semimeta_jax import run_dir
from semimeta_jax import train

DATA = pathlib.Path(__file__).parent / 'data'


def test_the_strong_view_fields_added_since_take_the_defaults_of_today():
  # A run recorded before data.randaugment resumes under today's defaults; a changed default must
  # change ADDED_FIELDS with it, or every earlier run would refuse to resume.
  defaults = default.get_config().data.randaugment.to_dict()
  added = {name.rsplit('.', 1)[1]: value for name, value in run_dir.ADDED_FIELDS.items()
           if name.startswith('data.randaugment.')}
  assert added == defaults


def test_saved_flat_names_are_read_as_todays_fields():
  saved = json.loads((DATA / 'config_before_method_blocks_mean_teacher.json').read_text())
  config = digits.get_config()
  current = json.loads(config.to_json_best_effort())
  upgraded = run_dir.upgrade_saved(saved, current)
  assert upgraded['ema.decay'] == 0.99 and upgraded['ema.headline'] is True
  assert upgraded['vat.epsilon'] == 2.0 and upgraded['temporal_ensembling.momentum'] == 0.5
  assert upgraded['fast_swa.cycles'] == 1
  assert not {'ema_decay', 'eval_with_ema', 'vat_epsilon', 'ensemble_momentum', 'mixup'} & upgraded.keys()
  # Every field of today's config has a value in the upgraded record.
  assert set(run_dir._flatten(current)) <= upgraded.keys()  # pylint: disable=protected-access


def _config_of_the_saved_run(data_dir, num_train_steps):
  """Today's spelling of the command that wrote the saved run."""
  config = digits.get_config()
  config.method = 'supervised'
  config.model_width = 4
  config.labeled_batch_size, config.unlabeled_batch_size, config.eval_batch_size = 16, 16, 32
  config.num_train_steps = num_train_steps
  config.checkpoint_every_steps = config.eval_every_steps = config.log_every_steps = 2
  config.keep_checkpoints = 1
  config.data.data_dir = str(data_dir)
  return config


def test_the_saved_config_matches_its_command_in_todays_names(tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(DATA / 'run_before_method_blocks', workdir)
  assert run_dir.check_config(str(workdir), _config_of_the_saved_run(tmp_path / 'tfds', 2)) == {}
  changed = _config_of_the_saved_run(tmp_path / 'tfds', 2)
  changed.vat.epsilon = 3.0  # Saved as vat_epsilon = 6.0: a change is still a change.
  with pytest.raises(run_dir.ConfigChangedError, match='vat.epsilon: saved 6.0, now 3.0'):
    run_dir.check_config(str(workdir), changed)


@pytest.mark.slow
def test_the_saved_run_resumes_from_its_checkpoint(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  workdir = tmp_path / 'run'
  shutil.copytree(DATA / 'run_before_method_blocks', workdir)
  summary = train.train_and_evaluate(_config_of_the_saved_run(tmp_path / 'tfds', 4), str(workdir))
  assert summary['completed'] and summary['steps'] == 4
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert sorted({row['step'] for row in rows if 'train/loss' in row}) == [2, 4]
  # Steps 1-2 come from the saved checkpoint, 3-4 from this run: it resumed, it did not start over.
  assert 'Resumed from the checkpoint at step 2.' in caplog.text
  assert not list((workdir / 'checkpoints').glob('corrupt.*'))
  assert (workdir / 'config.2.json').exists()  # The earlier record is kept beside the new one.
