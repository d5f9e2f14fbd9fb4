"""End to end on tfds mock data: MA-DNN and ADA-Net(+fast-SWA) train, and resume to the same state."""

import chex
import jax
import numpy as np
import pytest

from semimeta_jax import preemption

from tests.test_train import mock_config
from tests.test_train import run
from tests.test_train_methods import metric_rows
from tests.test_train_methods import saved_state

# ADA-Net's run ends in a one-cycle fast-SWA tail (steps 5 and 6 averaged), so the option's
# average is restored and continued too.
FAST_SWA = {'fast_swa.cycles': 1, 'fast_swa.cycle_steps': 2, 'fast_swa.average_every_steps': 1,
            'fast_swa.lr_max': 0.05, 'fast_swa.lr_min': 0.005, 'fast_swa.bn_update_batches': 2}
CASES = {
    'ma_dnn': ({'method': 'ma_dnn', 'ema.decay': 0.9, 'ema.headline': True}, 'train/memory_loss'),
    'adanet': ({'method': 'adanet', 'adanet.discriminator_width': 16, **FAST_SWA}, 'train/alignment_loss'),
}


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(CASES))
def test_runs_and_resumes_to_the_same_state(name, tmp_path, monkeypatch):
  overrides, loss_metric = CASES[name]
  config = mock_config(tmp_path, **overrides)
  whole = run(config, tmp_path / 'whole')
  assert whole['completed'] and 0.0 <= whole['final_error_top1'] <= 100.0
  rows = metric_rows(tmp_path / 'whole')
  train_rows = [row for row in rows if 'train/loss' in row]
  assert train_rows and all(np.isfinite(row[loss_metric]) and row[loss_metric] > 0 for row in train_rows)

  # Stopped at step 3 as a preemption stops it: the same config, so the schedules that read
  # num_train_steps (the reversal coefficient, the fast-SWA tail) are the uninterrupted run's.
  monkeypatch.setattr(preemption.PreemptionGuard, 'should_stop', lambda self, step: step == 3)
  first = run(config, tmp_path / 'resumed')
  assert first['preempted'] and first['steps'] == 3
  monkeypatch.undo()
  run(config, tmp_path / 'resumed')
  reference, resumed = saved_state(config, tmp_path / 'whole'), saved_state(config, tmp_path / 'resumed')
  chex.assert_trees_all_equal(resumed.params, reference.params)
  chex.assert_trees_all_equal(resumed.extra, reference.extra)
  if name == 'ma_dnn':
    # The memory learned from the labeled batches: some keys moved, every value row is a distribution.
    keys, values = (np.asarray(jax.device_get(reference.extra['ma_dnn'][k])) for k in ('keys', 'values'))
    assert np.any(keys != 0.0)
    np.testing.assert_allclose(values.sum(axis=1), 1.0, rtol=1e-5)
  else:
    evals = {row['step']: row for row in rows if 'eval/error_top1' in row}
    assert 'eval_swa/error_top1' in evals[6]
    assert int(jax.device_get(reference.extra['fast_swa']['count'])) == 2
    # The discriminator trained: its optimizer state counted every step.
    disc_opt_counts = [int(leaf) for leaf in jax.tree.leaves(reference.extra['adanet']['opt_state'])
                       if np.ndim(leaf) == 0]
    assert disc_opt_counts and all(count == 6 for count in disc_opt_counts)
