"""Meta Pseudo Labels end to end: mock data, the teacher's evaluation, resume, 8 devices."""

import chex
import jax
import numpy as np
import pytest

from semimeta_jax import parallel
from semimeta_jax.methods import mpl
from tests import conftest
from tests.conftest import synthetic_batch, tiny_config
from tests.test_parallel import one_step
from tests.test_train import mock_config
from tests.test_train import run
from tests.test_train_methods import metric_rows, saved_state

VARIANTS = {
    'exact': {'mpl.feedback': 'exact'},
    'paper': {'mpl.feedback': 'paper', 'mpl.soft_labels': False},
    'released_code': {'mpl.feedback': 'released_code'},
}


@pytest.mark.slow
def test_runs_evaluates_the_teacher_and_resumes_to_the_same_state(tmp_path):
  fields = {'method': 'mpl', 'mpl.feedback': 'released_code', 'mpl.student_wait_steps': 1}
  config = mock_config(tmp_path, **fields)
  summary = run(config, tmp_path / 'whole')
  assert summary['completed'] and 0.0 <= summary['final_error_top1'] <= 100.0
  evals = {row['step']: row for row in metric_rows(tmp_path / 'whole') if 'eval/error_top1' in row}
  assert sorted(evals) == [3, 6]
  assert all(row['eval_teacher/num_examples'] == 40 for row in evals.values())
  assert summary['final_error_top1'] == evals[6]['eval/error_top1']  # The student is the headline.

  run(mock_config(tmp_path, num_train_steps=3, **fields), tmp_path / 'resumed')
  run(config, tmp_path / 'resumed')
  whole, resumed = saved_state(config, tmp_path / 'whole'), saved_state(config, tmp_path / 'resumed')
  chex.assert_trees_all_equal(resumed.params, whole.params)
  chex.assert_trees_all_equal(resumed.batch_stats, whole.batch_stats)
  # The teacher, its statistics, optimizer state and the released code's moving baseline.
  chex.assert_trees_all_equal(resumed.extra, whole.extra)
  assert float(jax.device_get(whole.extra[mpl.TEACHER]['baseline'])) != 0.0


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_eight_devices_match_one(name):
  config = tiny_config(method='mpl', **VARIANTS[name])
  batch = jax.tree.map(np.asarray, synthetic_batch(jax.random.key(1)))
  state8, metrics8 = one_step(config, parallel.make_mesh(conftest.cpu_devices(8)), batch)
  state1, metrics1 = one_step(config, parallel.make_mesh(conftest.cpu_devices(1)), batch)
  teacher8 = state8.extra[mpl.TEACHER]['params']
  assert len(jax.tree.leaves(teacher8)[0].sharding.device_set) == 8
  chex.assert_trees_all_close(state8.params, state1.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state8.batch_stats, state1.batch_stats, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state8.extra, state1.extra, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(metrics8, metrics1, rtol=1e-4, atol=1e-6)
