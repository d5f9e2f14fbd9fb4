"""End to end under tfds mock data: train, evaluate, checkpoint, resume, preemption, NaN."""

import errno
import json
import os
import pathlib
import re
import shutil

import chex
import jax
import numpy as np
from orbax.checkpoint._src.path import atomicity
import pytest
import tensorflow_datasets as tfds

from semimeta_jax import checkpoint
from semimeta_jax import data
from semimeta_jax import errors
from semimeta_jax import metrics as metrics_lib
from semimeta_jax import models
from semimeta_jax import parallel
from semimeta_jax import preemption
from semimeta_jax import run_dir
from semimeta_jax import train
from semimeta_jax import workdir_lock
from tests.conftest import tiny_config

NUM_STEPS = 6


def mock_config(tmp_path, **overrides):
  """A tiny SemiMeta run on mock CIFAR-10: 6 steps, checkpoints at 3 and 6."""
  return tiny_config(**{
      'data.name': 'cifar10', 'data.num_labels': 10, 'data.data_dir': str(tmp_path / 'tfds'),
      'labeled_batch_size': 8, 'unlabeled_batch_size': 8, 'eval_batch_size': 24,
      'num_train_steps': NUM_STEPS, 'log_every_steps': 2, 'eval_every_steps': 3,
      'checkpoint_every_steps': 3, **overrides})


def run(config, workdir):
  # 40 test examples: not a multiple of the eval batch, so the last batch is padded.
  with tfds.testing.mock_data(num_examples=40):
    return train.train_and_evaluate(config, str(workdir))


def saved_params(config, workdir, step=None):
  mesh = parallel.make_mesh()
  model = models.get_model(config, 10)
  target = train.create_train_state(config, model, (32, 32, 3), mesh)
  with checkpoint.Checkpointer(str(workdir), keep=3, read_only=True) as checkpointer:
    return checkpointer.restore(target, step).params


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp('uninterrupted')
  config = mock_config(tmp_path, hypergrad_diagnostics_every_steps=3)
  summary = run(config, tmp_path / 'run')
  return config, tmp_path / 'run', summary


@pytest.mark.slow
def test_a_run_trains_evaluates_exactly_and_writes_its_records(uninterrupted):
  _, workdir, summary = uninterrupted
  assert summary['completed'] and summary['steps'] == NUM_STEPS
  assert summary['num_eval_examples'] == 40
  assert 0.0 <= summary['final_error_top1'] <= 100.0
  with open(workdir / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  evals = [row for row in rows if 'eval/error_top1' in row]
  assert [row['step'] for row in evals] == [3, 6]
  assert all(row['eval/num_examples'] == 40 for row in evals)  # Every example once, padding masked.
  train_rows = [row for row in rows if 'train/loss' in row]
  assert [row['step'] for row in train_rows] == [2, 3, 4, 6]
  assert 'train/pseudo_label_accuracy' in train_rows[-1]
  fidelity = [row for row in rows if 'hypergrad/cosine' in row]
  assert [row['step'] for row in fidelity] == [3, 6]
  assert all(-1.0 <= row['hypergrad/cosine'] <= 1.0 + 1e-6 for row in fidelity)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3', '6']
  for name in ('summary.json', 'config.json', 'labeled_indices.json'):
    assert (workdir / name).exists(), name


@pytest.mark.slow
def test_an_interrupted_and_resumed_run_ends_with_identical_parameters(uninterrupted, tmp_path):
  config, reference_dir, _ = uninterrupted
  workdir = tmp_path / 'run'
  first = run(mock_config(tmp_path, num_train_steps=3), workdir)
  assert first['steps'] == 3
  resumed = run(mock_config(tmp_path), workdir)
  assert resumed['steps'] == NUM_STEPS and resumed['completed']
  chex.assert_trees_all_equal(saved_params(config, workdir), saved_params(config, reference_dir))


@pytest.mark.slow
def test_a_preempted_run_saves_then_resumes_to_the_same_parameters(uninterrupted, tmp_path, monkeypatch):
  config, reference_dir, _ = uninterrupted
  workdir = tmp_path / 'run'
  monkeypatch.setattr(preemption.PreemptionGuard, 'should_stop', lambda self, step: step == 2)
  summary = run(mock_config(tmp_path), workdir)
  assert summary['preempted'] and summary['steps'] == 2
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2']
  monkeypatch.undo()
  run(mock_config(tmp_path), workdir)
  chex.assert_trees_all_equal(saved_params(config, workdir), saved_params(config, reference_dir))


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_and_the_advised_command_resumes(tmp_path, monkeypatch):
  build_input = data.build_input

  def poisoned_input(*args, **kwargs):
    inp = build_input(*args, **kwargs)
    clean = inp.train_batch

    def batch(index):  # Index 4 trains step 5.
      out = clean(index)
      if index == 4:
        out['labeled']['image'] = out['labeled']['image'] * float('nan')
      return out

    inp.train_batch = batch
    return inp

  monkeypatch.setattr(data, 'build_input', poisoned_input)
  workdir = tmp_path / 'run'
  with pytest.raises(train.NonFiniteLossError,
                     match=r'non-finite between steps 4 and 6.*last good checkpoint \(step 3, '
                           r'checksums verified\)') as error:
    run(mock_config(tmp_path), workdir)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3']
  # The advice, followed as written (the poisoned batch was a one-off), resumes from step 3.
  monkeypatch.undo()
  advice = str(error.value).split('rerun the same command with', 1)[1]
  overrides = dict(re.findall(r'--config\.(\w+)=(\S+)', advice))
  assert overrides == {'allow_config_change': 'True', 'learning_rate': '0.005'}
  summary = run(mock_config(tmp_path, allow_config_change=True, learning_rate=0.005), workdir)
  assert summary['completed'] and summary['steps'] == NUM_STEPS
  assert json.loads((workdir / 'config.3.json').read_text())['learning_rate'] == 0.05
  assert json.loads((workdir / 'config.json').read_text())['learning_rate'] == 0.005


@pytest.mark.slow
def test_a_workdir_holding_another_config_is_refused(uninterrupted, tmp_path):
  config, workdir, _ = uninterrupted
  changed = mock_config(tmp_path, seed=config.seed + 1, hypergrad_diagnostics_every_steps=3)
  with pytest.raises(run_dir.ConfigChangedError, match='seed'):
    run(changed, workdir)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3', '6']


def test_bad_input_fails_before_the_workdir_is_touched(tmp_path):
  workdir = tmp_path / 'never'
  with pytest.raises(parallel.BatchSizeError, match='config.labeled_batch_size=12 does not divide'):
    run(mock_config(tmp_path, labeled_batch_size=12, unlabeled_batch_size=12), workdir)
  with pytest.raises(ValueError, match='config.hypergrad.mode'):
    run(mock_config(tmp_path, **{'hypergrad.mode': 'second_order'}), workdir)
  assert not workdir.exists()
  assert jax.device_count() == 8  # The checks above were against eight devices.


@pytest.mark.slow
@pytest.mark.parametrize('overrides, message', [
    ({'data.num_labels': 55}, 'not divisible by the 10 classes'),
    ({'data.num_labels': 100000}, 'class 0 has only'),
    ({'data.pad_mode': 'wrap'}, 'config.data.pad_mode'),
    ({'learning_rate': float('inf')}, 'config.learning_rate=inf: must be a finite number'),
])
def test_a_bad_first_run_leaves_no_workdir_and_the_corrected_command_runs(
    tmp_path, overrides, message):
  workdir = tmp_path / 'run'
  with pytest.raises(errors.UserError, match=message):
    run(mock_config(tmp_path, **overrides), workdir)
  assert not workdir.exists()
  if overrides == {'data.pad_mode': 'wrap'}:  # The corrected command, once (each run compiles).
    assert run(mock_config(tmp_path, num_train_steps=1), workdir)['completed']


def test_an_empty_workdir_is_refused():
  with pytest.raises(run_dir.WorkdirError, match='--workdir is empty'):
    train.train_and_evaluate(mock_config(pathlib.Path('unused')), '')


@pytest.mark.slow
def test_a_second_run_on_a_workdir_in_use_is_refused_and_writes_nothing(uninterrupted, tmp_path):
  config, reference_dir, _ = uninterrupted
  workdir = tmp_path / 'run'
  shutil.copytree(reference_dir, workdir)
  before = sorted(p.relative_to(workdir) for p in workdir.rglob('*'))
  with workdir_lock.WorkdirLock(workdir, enabled=True):  # The first run, still training.
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f'in use by another run .*pid {os.getpid()}'):
      run(config, workdir)
  assert sorted(p.relative_to(workdir) for p in workdir.rglob('*')) == before


@pytest.mark.slow
def test_a_finished_run_resumed_with_fewer_steps_is_refused(uninterrupted):
  config, reference_dir, _ = uninterrupted
  shorter = config.copy_and_resolve_references()
  shorter.num_train_steps = 4
  with pytest.raises(run_dir.ConfigChangedError, match='already at step 6, past config.num_train_steps=4'):
    run(shorter, reference_dir)
  assert json.loads((reference_dir / 'summary.json').read_text())['completed']


@pytest.mark.slow
def test_a_damaged_checkpoint_and_a_torn_metrics_line_fall_back_to_the_same_final_state(
    uninterrupted, tmp_path, caplog):
  config, reference_dir, _ = uninterrupted
  workdir = tmp_path / 'run'
  shutil.copytree(reference_dir, workdir)
  # A run killed at random: a damaged last checkpoint, half a metrics row, its stale lock.
  for path in (workdir / 'checkpoints' / '6' / 'state').rglob('*'):
    if path.parent.name == 'd':  # Whichever data file holds what: damage them all, sizes kept.
      with open(path, 'r+b') as f:
        f.seek(path.stat().st_size // 2)
        f.write(np.random.default_rng(0).bytes(64))
  with open(workdir / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 6, "eval/error_')
  (workdir / 'LOCK').write_text('{"host": "gone", "pid": 1, "started": "earlier"}')
  summary = run(config, workdir)
  assert summary['completed']
  logged = [r.getMessage() for r in caplog.records]
  assert any(m.startswith('Checkpoint 6 is ') and 'corrupt.6' in m for m in logged), logged
  assert any('torn last line of ' + str(workdir / 'metrics.jsonl') in m for m in logged), logged
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3', '6', 'corrupt.6']
  chex.assert_trees_all_equal(saved_params(config, workdir), saved_params(config, reference_dir))
  with open(workdir / 'metrics.jsonl') as f:
    assert all(json.loads(line) for line in f)  # Every row whole again.


@pytest.mark.slow
def test_a_failed_save_stops_the_run_naming_its_step_and_a_rerun_resumes(
    uninterrupted, tmp_path, monkeypatch):
  config, reference_dir, _ = uninterrupted
  workdir = tmp_path / 'run'

  async def no_space(self):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', no_space)
  with pytest.raises(checkpoint.CheckpointSaveError,
                     match=r'^Saving checkpoint 3 .*No space left on device.*no earlier checkpoint'):
    run(config, workdir)
  # It stopped before logging any step after the failed save: not at the next save (6).
  assert max(row['step'] for row in metrics_lib.read_rows(workdir)) == 3
  monkeypatch.undo()
  assert run(config, workdir)['completed']  # Space freed: the same command runs.
  chex.assert_trees_all_equal(saved_params(config, workdir), saved_params(config, reference_dir))
