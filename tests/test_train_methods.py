"""End to end on tfds mock data: Temporal Ensembling (resumed identically), VAT+Ent, MT + fast-SWA."""

import pytest
import json

import chex
import jax

from semimeta_jax import checkpoint
from semimeta_jax import models
from semimeta_jax import parallel
from semimeta_jax import train
from tests.test_train import mock_config
from tests.test_train import run

NUM_TRAIN = 40  # tfds.testing.mock_data(num_examples=40) in `run`.


def saved_state(config, workdir):
  target = train.create_train_state(config, models.get_model(config, 10), (32, 32, 3),
                                    parallel.make_mesh(), num_train=NUM_TRAIN, num_classes=10)
  with checkpoint.Checkpointer(str(workdir), keep=3, read_only=True) as checkpointer:
    return checkpointer.restore(target)


def metric_rows(workdir):
  with open(workdir / 'metrics.jsonl') as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_temporal_ensembling_runs_and_resumes_to_the_same_ensemble(tmp_path):
  te = {'method': 'temporal_ensembling', 'consistency_rampup': 'sigmoid', 'max_translation': 1}
  config = mock_config(tmp_path, **te)
  reference = run(config, tmp_path / 'whole')
  assert reference['completed'] and 0.0 <= reference['final_error_top1'] <= 100.0
  run(mock_config(tmp_path, num_train_steps=3, **te), tmp_path / 'resumed')
  run(config, tmp_path / 'resumed')
  whole, resumed = saved_state(config, tmp_path / 'whole'), saved_state(config, tmp_path / 'resumed')
  chex.assert_trees_all_equal(resumed.params, whole.params)
  chex.assert_trees_all_equal(resumed.extra, whole.extra)
  # 6 steps of 8 labeled + 8 unlabeled draws: every visit is counted once.
  assert int(jax.device_get(whole.extra['visits']).sum()) == 6 * 16
  assert any(row.get('train/ensemble_coverage', 0) > 0 for row in metric_rows(tmp_path / 'whole'))


@pytest.mark.slow
def test_vat_ent_runs(tmp_path):
  config = mock_config(tmp_path, method='vat', entropy_weight=1.0, vat_epsilon=2.0,
                       consistency_rampup_steps=0)
  summary = run(config, tmp_path / 'run')
  assert summary['completed'] and 0.0 <= summary['final_error_top1'] <= 100.0
  train_rows = [row for row in metric_rows(tmp_path / 'run') if 'train/loss' in row]
  assert all(row['train/consistency_loss'] > 0 and row['train/entropy_loss'] > 0 for row in train_rows)


@pytest.mark.slow
def test_mean_teacher_with_fast_swa_reports_the_averaged_weights(tmp_path):
  config = mock_config(tmp_path, **{
      'method': 'mean_teacher', 'ema.decay': 0.9, 'num_train_steps': 8, 'eval_every_steps': 4,
      'checkpoint_every_steps': 4, 'fast_swa.cycles': 1, 'fast_swa.cycle_steps': 4,
      'fast_swa.average_every_steps': 2, 'fast_swa.lr_max': 0.05, 'fast_swa.lr_min': 0.005,
      'fast_swa.bn_update_batches': 2})
  summary = run(config, tmp_path / 'run')
  rows = metric_rows(tmp_path / 'run')
  evals = {row['step']: row for row in rows if 'eval/error_top1' in row}
  assert sorted(evals) == [4, 8]
  assert 'eval_swa/error_top1' not in evals[4]  # The tail starts after step 4: no average yet.
  assert {'eval_ema/error_top1', 'eval_swa/error_top1'} <= set(evals[8])
  assert evals[8]['eval_swa/num_examples'] == 40
  assert summary['final_error_top1'] == evals[8]['eval_swa/error_top1']  # fast_swa.headline.
  state = saved_state(config, tmp_path / 'run')
  assert int(jax.device_get(state.extra['fast_swa']['count'])) == 2  # After updates 6 and 8.
