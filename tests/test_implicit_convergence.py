"""The CG-convergence table of `implicit`: rows against the largest count, and the estimator it calls."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import implicit_convergence
from semimeta_jax import models
from semimeta_jax import state as state_lib
from semimeta_jax.methods import common
from semimeta_jax.methods import hypergrad
from tests.conftest import synthetic_batch
from tests.conftest import tiny_config


def test_rows_compare_each_count_with_the_largest():
  reference = jnp.asarray([[3.0, 4.0]])
  per_batch = [{5: jnp.asarray([[3.0, 0.0]]), 40: reference}] * 2
  rows = implicit_convergence.convergence_rows(per_batch, step=7, iterations=[5, 40])
  assert [r['cg_iterations'] for r in rows] == [5, 40]
  np.testing.assert_allclose(rows[0]['cosine'], 0.6)  # (3*3) / (3 * 5).
  np.testing.assert_allclose(rows[0]['relative_error'], 4.0 / 5.0)
  assert rows[1]['cosine'] == 1.0 and rows[1]['relative_error'] == 0.0
  lines = implicit_convergence.convergence_table(rows).splitlines()
  assert lines[0] == '| CG steps | step 7 |' and lines[2] == '| 5 | 0.60000 / 8.00e-01 |'


@pytest.mark.slow  # Four implicit solves of a ConvLarge, traced eagerly.
def test_each_count_is_the_raw_implicit_hypergradient():
  config = tiny_config(**{'hypergrad.meta_step_scale': 'first_step_norm'})
  state = state_lib.init_train_state(config, models.get_model(config, 10), (8, 8, 1), jax.random.key(0))
  batch = synthetic_batch(jax.random.key(1), batch_size=4)
  grads = implicit_convergence.implicit_hypergradients(state, batch, 0.1, config=config,
                                                       iterations=[2, 6], loop_unroll=4)
  x_u = batch['unlabeled']['image']
  apply_fn = functools.partial(common.eval_forward, state)
  for count in (2, 6):  # Not rescaled to the K = 1 norm: the solver's own output.
    expected = hypergrad.implicit(apply_fn, state.params, batch['labeled']['image'],
                                  batch['labeled']['label'], x_u, None, cg_iterations=count,
                                  cg_damping=config.hypergrad.cg_damping)
    np.testing.assert_allclose(grads[count], expected, rtol=2e-4, atol=1e-7)
  assert not np.allclose(grads[2], grads[6])
