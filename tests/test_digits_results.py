"""The results runner: labels from the runs, no silent reuse of another config, no contradicting overrides."""

import json

import pytest

from experiments import digits_results


@pytest.fixture(scope='module')
def runner():
  return digits_results


def test_overrides_are_applied_with_the_config_parser(runner):
  config = runner.resolve_config(['--config.seed=3', '--config.data.num_labels=30',
                                  '--config.hypergrad.mode=exact'])
  assert config['seed'] == 3 and config['data']['num_labels'] == 30
  assert config['hypergrad']['mode'] == 'exact'
  assert config['method'] == 'semimeta'  # Untouched fields keep configs/digits.py's values.


def test_an_override_contradicting_the_variant_is_refused(runner):
  with pytest.raises(ValueError, match='contradicts variant .fully_supervised.'):
    runner.check_overrides('fully_supervised', ['--config.data.num_labels=30'])
  runner.check_overrides('fully_supervised', ['--config.data.num_labels=-1'])  # Agrees: fine.
  runner.check_overrides('labeled_only', ['--config.data.num_labels=30'])  # Not the variant's field.


def test_a_finished_run_of_another_config_is_not_reused(runner, tmp_path):
  workdir = tmp_path / 'labeled_only' / 'seed_0'
  workdir.mkdir(parents=True)
  ran = runner.resolve_config(['--config.seed=0', *runner.VARIANTS['labeled_only']])
  (workdir / 'summary.json').write_text(json.dumps(
      {'completed': True, 'config': ran, 'final_error_top1': 10.0, 'best_error_top1': 9.0,
       'num_labeled': 50, 'wall_seconds_this_run': 1.0}))
  # The same config is reused without running anything.
  assert runner.run_one('labeled_only', 0, tmp_path, None, [])['final_error_top1'] == 10.0
  # So is a run whose config differs only in fields that change no result (remat, cadences),
  # including a run from before such a field existed.
  del ran['remat']
  ran['log_every_steps'] = 7
  (workdir / 'summary.json').write_text(json.dumps(
      {'completed': True, 'config': ran, 'final_error_top1': 10.0, 'best_error_top1': 9.0,
       'num_labeled': 50, 'wall_seconds_this_run': 1.0}))
  assert runner.run_one('labeled_only', 0, tmp_path, None,
                        ['--config.remat=batch_norm'])['final_error_top1'] == 10.0
  # A run recorded before a field was renamed, or added at its default, is read in today's fields.
  ran['data']['folder_augment'] = ran['data'].pop('augment_kind')
  del ran['data']['max_in_memory_gb']
  (workdir / 'summary.json').write_text(json.dumps(
      {'completed': True, 'config': ran, 'final_error_top1': 10.0, 'best_error_top1': 9.0,
       'num_labeled': 50, 'wall_seconds_this_run': 1.0}))
  assert runner.run_one('labeled_only', 0, tmp_path, None, [])['final_error_top1'] == 10.0
  with pytest.raises(RuntimeError, match=r'data\.max_in_memory_gb: ran 4.0, requested 1.0'):
    runner.run_one('labeled_only', 0, tmp_path, None, ['--config.data.max_in_memory_gb=1.0'])
  with pytest.raises(RuntimeError, match=r'data\.num_labels: ran 50, requested 30'):
    runner.run_one('labeled_only', 0, tmp_path, None, ['--config.data.num_labels=30'])


def test_the_table_names_the_label_budget_the_runs_used(runner):
  rows = [{'variant': 'labeled_only', 'seed': s, 'final_error_top1': e, 'best_error_top1': e,
           'num_labeled': 30, 'wall_seconds': 60.0} for s, e in ((0, 10.0), (1, 12.0))]
  table = runner.table(rows)
  assert '| Labeled only (30 labels) | 2 | 11.00 ± 1.00 | 11.00 ± 1.00 | 60 |' in table
