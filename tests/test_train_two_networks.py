"""Two-network methods end to end: mock data, resume, the second network's evaluation, 8 devices."""

import chex
import jax
import numpy as np
import pytest

from semimeta_jax import parallel
from semimeta_jax.methods import second_network
from tests import conftest
from tests.conftest import synthetic_batch, tiny_config
from tests.test_parallel import one_step
from tests.test_train import mock_config
from tests.test_train import run
from tests.test_train_methods import metric_rows, saved_state

METHODS = {
    'co_training': {'method': 'co_training', 'consistency_rampup': 'sigmoid', 'consistency_rampup_steps': 4},
    'dual_student': {'method': 'dual_student', 'consistency_rampup': 'sigmoid', 'consistency_rampup_steps': 4,
                     'perturb.max_translation': 1},
}


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(METHODS))
def test_runs_evaluates_both_networks_and_resumes_to_the_same_state(name, tmp_path):
  config = mock_config(tmp_path, **METHODS[name])
  summary = run(config, tmp_path / 'whole')
  assert summary['completed'] and 0.0 <= summary['final_error_top1'] <= 100.0
  evals = {row['step']: row for row in metric_rows(tmp_path / 'whole') if 'eval/error_top1' in row}
  assert sorted(evals) == [3, 6]
  assert all(row['eval_second/num_examples'] == 40 for row in evals.values())
  assert summary['final_error_top1'] == evals[6]['eval/error_top1']  # Network 1 is the headline.

  run(mock_config(tmp_path, num_train_steps=3, **METHODS[name]), tmp_path / 'resumed')
  run(config, tmp_path / 'resumed')
  whole, resumed = saved_state(config, tmp_path / 'whole'), saved_state(config, tmp_path / 'resumed')
  chex.assert_trees_all_equal(resumed.params, whole.params)
  chex.assert_trees_all_equal(resumed.batch_stats, whole.batch_stats)
  # The second network, its batch statistics and optimizer state (and Dual Student's heads).
  chex.assert_trees_all_equal(resumed.extra, whole.extra)
  assert int(jax.device_get(whole.step)) == 6
  first = jax.tree.leaves(whole.params)
  second = jax.tree.leaves(whole.extra[second_network.KEY]['params'])
  assert any(not np.array_equal(a, b) for a, b in zip(first, second))


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(METHODS))
def test_eight_devices_match_one(name):
  config = tiny_config(**METHODS[name])
  batch = jax.tree.map(np.asarray, synthetic_batch(jax.random.key(1)))
  state8, metrics8 = one_step(config, parallel.make_mesh(conftest.cpu_devices(8)), batch)
  state1, metrics1 = one_step(config, parallel.make_mesh(conftest.cpu_devices(1)), batch)
  second8 = state8.extra[second_network.KEY]['params']
  assert len(jax.tree.leaves(second8)[0].sharding.device_set) == 8
  chex.assert_trees_all_close(state8.params, state1.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state8.batch_stats, state1.batch_stats, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state8.extra, state1.extra, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(metrics8, metrics1, rtol=1e-4, atol=1e-6)
