"""The results runner: labels from the runs, no silent reuse of another config, no contradicting overrides."""

import json
import pathlib

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
  rows = [{'variant': 'labeled_only', 'seed': s, 'final_error_top1': e, 'median_last_20_error_top1': e,
           'num_labeled': 30, 'wall_seconds': 60.0} for s, e in ((0, 10.0), (1, 12.0))]
  table = runner.table(rows)
  assert '| Labeled only (30 labels) | 2 | 11.00 ± 1.00 | 11.00 ± 1.00 | 60 |' in table


def _in_flat_names(config, renamed):
  """A resolved config as the version before method blocks recorded it (earlier flat names)."""
  flat = {}
  def walk(tree, prefix=''):
    for key, value in tree.items():
      if isinstance(value, dict):
        walk(value, f'{prefix}{key}.')
      else:
        flat[prefix + key] = value
  walk(config)
  earlier = {new: old for old, new in renamed.items()}
  nested = {}
  for name, value in flat.items():
    *parents, leaf = earlier.get(name, name).split('.')
    target = nested
    for parent in parents:
      target = target.setdefault(parent, {})
    target[leaf] = value
  return nested


def test_a_variant_reads_its_methods_preset_and_reuses_runs_recorded_in_flat_names(runner, tmp_path):
  from semimeta_jax import methods  # pylint: disable=g-import-not-at-top
  for name, preset in methods.presets('digits').items():
    resolved = runner.resolve_config(runner.VARIANTS[name])
    for field, value in preset.items():
      target = resolved
      for part in field.split('.'):
        target = target[part]
      assert target == value, (name, field)
  workdir = tmp_path / 'mean_teacher_fast_swa' / 'seed_0'
  workdir.mkdir(parents=True)
  ran = runner.resolve_config(['--config.seed=0', *runner.VARIANTS['mean_teacher_fast_swa']])
  old = _in_flat_names(ran, runner.RENAMED_FIELDS)
  assert old['ema_decay'] == 0.99 and old['eval_with_ema'] is True and 'ema' not in old
  (workdir / 'summary.json').write_text(json.dumps(
      {'completed': True, 'config': old, 'final_error_top1': 7.0, 'best_error_top1': 6.0,
       'num_labeled': 50, 'wall_seconds_this_run': 1.0}))
  assert runner.run_one('mean_teacher_fast_swa', 0, tmp_path, None, [])['final_error_top1'] == 7.0
  with pytest.raises(RuntimeError, match=r'ema\.decay: ran 0.99, requested 0.9'):
    runner.run_one('mean_teacher_fast_swa', 0, tmp_path, None, ['--config.ema.decay=0.9'])


def test_a_tnar_variant_trains_its_seeds_vae_once_and_runs_with_it(runner, tmp_path, monkeypatch):
  calls = []

  def fake_run(command, **kwargs):
    del kwargs
    calls.append(command)
    workdir = next(arg.split('=', 1)[1] for arg in command if arg.startswith('--workdir='))
    (pathlib.Path(workdir) / 'vae.json').write_text('{}')
    return type('Done', (), {'returncode': 0})()

  monkeypatch.setattr(runner.subprocess, 'run', fake_run)
  overrides = ['--config.seed=2', *runner.VARIANTS['tnar_vae']]
  workdir = tmp_path / 'tnar_vae' / 'seed_2'
  flag = runner.trained_vae(workdir, overrides)
  vae_dir = (tmp_path / 'tnar_vae' / 'seed_2_vae').resolve()
  assert flag == [f'--config.tnar.vae_dir={vae_dir}']
  assert len(calls) == 1 and calls[0][1:3] == ['-m', 'semimeta_jax.vae_main']
  assert calls[0][-len(overrides):] == overrides  # The VAE sees the run's data, seed and vae block.
  assert runner.trained_vae(workdir, overrides) == flag and len(calls) == 1  # Reused, not retrained.
  # Other variants, and a TNAR run given its VAE, train nothing.
  assert runner.trained_vae(workdir, ['--config.seed=2', *runner.VARIANTS['vat']]) == []
  assert runner.trained_vae(workdir, [*overrides, '--config.tnar.vae_dir=/elsewhere']) == []
  assert len(calls) == 1


def test_every_variant_is_a_valid_config(runner):
  """A typo in a variant's overrides would only show when its runs start, minutes into a table."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from semimeta_jax import methods  # pylint: disable=g-import-not-at-top
  for variant, overrides in runner.VARIANTS.items():
    config = ml_collections.ConfigDict(runner.resolve_config(overrides))
    methods.get(config.method).validate(config)
  horizon = runner.resolve_config(runner.VARIANTS['semimeta_eval_k4'])['hypergrad']
  assert (horizon['mode'], horizon['inner_steps'], horizon['meta_step_scale']) == (
      'neumann', 4, 'first_step_norm')


def test_the_fashion_mnist_runner_runs_its_config_with_its_presets_and_validation_split(
    tmp_path, monkeypatch):
  from experiments import fashion_mnist_results  # pylint: disable=g-import-not-at-top
  commands = []

  def fake_main_run(command, **kwargs):
    """Stands in for `python -m semimeta_jax.main`: a summary of the config the command names."""
    del kwargs
    commands.append(command)
    flags_list = [a for a in command[4:] if not a.startswith('--workdir=')]
    workdir = pathlib.Path(next(a.split('=', 1)[1] for a in command if a.startswith('--workdir=')))
    config = digits_results.resolve_config(flags_list, 'fashion_mnist')
    seed = config['seed']
    (workdir / 'summary.json').write_text(json.dumps(
        {'completed': True, 'config': config, 'final_error_top1': 10.0 + seed,
         'median_last_20_error_top1': 11.0 + seed, 'median_last_20_count': 20,
         'test_error_top1_at_best_validation': 12.0 + seed, 'num_validation_examples': 1000,
         'num_labeled': config['data']['num_labels'], 'wall_seconds_this_run': 600.0}))
    return type('Done', (), {'returncode': 0})()

  monkeypatch.setattr(digits_results.subprocess, 'run', fake_main_run)
  fashion_mnist_results.main([f'--out={tmp_path}', '--seeds=0,1', '--variants=vat_ent,labeled_only'])
  assert len(commands) == 4
  assert all(c[1:4] == ['-m', 'semimeta_jax.main', '--config=configs/fashion_mnist.py']
             for c in commands)
  vat = digits_results.resolve_config(
      [a for a in commands[0][4:] if not a.startswith('--workdir=')], 'fashion_mnist')
  assert (vat['method'], vat['vat']['epsilon'], vat['data']['validation_size']) == ('vat', 6.0, 1000)
  assert vat['data']['num_labels'] == 1000 and (vat['model_width'], vat['dropout_rate']) == (16, 0.1)
  table = (tmp_path / 'table_vat_ent_labeled_only.md').read_text()
  assert '--validation_size=1000' in table and 'experiments.fashion_mnist_results' in table
  assert '| VAT+Ent | 2 | 10.50 ± 0.50 | 11.50 ± 0.50 | 12.50 ± 0.50 | 600 |' in table
  assert '| Labeled only (1000 labels) | 2 |' in table
  # Rerunning reuses the finished runs.
  fashion_mnist_results.main([f'--out={tmp_path}', '--seeds=0,1', '--variants=vat_ent,labeled_only'])
  assert len(commands) == 4
