"""End to end on tfds mock data: Mean Teacher + SNTG and VAT + VAdD run, resume, and match on 8 devices."""

import chex
import jax
import numpy as np
import pytest

from semimeta_jax import parallel
from tests import conftest
from tests.conftest import synthetic_batch, tiny_config
from tests.test_parallel import one_step
from tests.test_train import mock_config
from tests.test_train import run
from tests.test_train_methods import metric_rows
from tests.test_train_methods import saved_state

MT_SNTG = {'method': 'mean_teacher', 'ema.decay': 0.9, 'sntg.weight': 0.4,
           'consistency_rampup': 'sigmoid', 'consistency_rampup_steps': 4}
VAT_VADD = {'method': 'vat_vadd', 'vat.xi': 0.0, 'vat.epsilon': 2.0, 'vat.entropy_weight': 1.0,
            'vadd.delta': 0.5, 'consistency_rampup': 'sigmoid', 'consistency_rampup_steps': 4}


@pytest.mark.slow
@pytest.mark.parametrize('fields,term', [(MT_SNTG, 'sntg_loss'), (VAT_VADD, 'vadd_loss')],
                         ids=['mean_teacher_sntg', 'vat_vadd'])
def test_runs_and_resumes_to_the_same_state(tmp_path, fields, term):
  config = mock_config(tmp_path, **fields)
  reference = run(config, tmp_path / 'whole')
  assert reference['completed'] and 0.0 <= reference['final_error_top1'] <= 100.0
  run(mock_config(tmp_path, num_train_steps=3, **fields), tmp_path / 'resumed')
  run(config, tmp_path / 'resumed')
  whole, resumed = saved_state(config, tmp_path / 'whole'), saved_state(config, tmp_path / 'resumed')
  chex.assert_trees_all_equal(resumed.params, whole.params)
  chex.assert_trees_all_equal(resumed.extra, whole.extra)
  rows = [row for row in metric_rows(tmp_path / 'whole') if 'train/loss' in row]
  assert rows and all(row[f'train/{term}'] > 0 for row in rows)
  if term == 'vadd_loss':  # Half of the 4 pooled units may flip: some do.
    assert any(row['train/vadd_flipped_units'] > 0 for row in rows)


@pytest.mark.slow
@pytest.mark.parametrize('fields', [MT_SNTG, VAT_VADD, {'method': 'temporal_ensembling', 'sntg.weight': 0.4},
                                    {'method': 'pi_model', 'sntg.weight': 0.4},
                                    {'method': 'vat', 'vat.xi': 0.0, 'sntg.weight': 0.4}],
                         ids=['mean_teacher_sntg', 'vat_vadd', 'te_sntg', 'pi_sntg', 'vat_sntg'])
def test_eight_devices_match_one(fields):
  config = tiny_config(**fields)
  batch = jax.tree.map(np.asarray, synthetic_batch(jax.random.key(1)))
  state8, metrics8 = one_step(config, parallel.make_mesh(conftest.cpu_devices(8)), batch)
  state1, metrics1 = one_step(config, parallel.make_mesh(conftest.cpu_devices(1)), batch)
  chex.assert_trees_all_close(state8.params, state1.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state8.batch_stats, state1.batch_stats, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state8.extra, state1.extra, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(metrics8, metrics1, rtol=1e-4, atol=1e-6)
  term = 'vadd_loss' if fields['method'] == 'vat_vadd' else 'sntg_loss'
  assert float(metrics1[term]) > 0
  if fields['method'] == 'vat_vadd':
    assert float(metrics1['vadd_flipped_units']) > 0
