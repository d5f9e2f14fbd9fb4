"""The MPL ablation's fidelity rows on one tiny batch: what each row compares is what it says."""

import functools

import jax
import numpy as np
import pytest

from experiments import mpl_ablation
from semimeta_jax import methods
from semimeta_jax.methods import mpl
from tests.conftest import synthetic_batch, tiny_config
from tests.tiny_net import TinyNet


@pytest.mark.slow
def test_fidelity_rows_compare_each_feedback_with_the_exact_one():
  config = tiny_config(method='mpl', dropout_rate=0.0)
  state = methods.init_train_state(config, TinyNet(num_classes=10), (8, 8, 1), jax.random.key(0),
                                   num_classes=10)
  batch = synthetic_batch(jax.random.key(1))
  rows = jax.device_get(jax.jit(functools.partial(mpl_ablation.fidelity, config=config, samples=3))(
      state, batch))
  # jvp is the exact K = 1 meta-gradient; the finite difference its second-order approximation.
  np.testing.assert_allclose(rows['jvp']['cosine'], 1.0, atol=1e-5)
  np.testing.assert_allclose(rows['jvp']['norm_ratio'], 1.0, atol=1e-4)
  assert rows['finite_difference']['cosine'] > 0.99
  # The two signs of one draw: opposite cosines, equal norms.
  plus, minus = rows['paper (h_sign +1, one draw)'], rows['paper (h_sign -1, one draw)']
  np.testing.assert_allclose(minus['cosine'], -plus['cosine'], rtol=1e-5)
  np.testing.assert_allclose(minus['norm_ratio'], plus['norm_ratio'], rtol=1e-5)
  assert abs(plus['cosine']) > 0 and 'paper (h_sign +1, mean of 3 draws)' in rows
  assert rows['released_code']['norm_ratio'] < 1e-5  # The released term's gradient is zero.
  # The reference is the step's own feedback: the gradient of the `exact` step's feedback term.
  reference = mpl_ablation._flat(jax.jit(functools.partial(mpl.feedback_gradient, config=config))(state, batch))
  assert float(np.linalg.norm(reference)) > 0


def test_fidelity_table_puts_each_variant_in_a_row_and_each_step_in_a_column():
  rows = [{'step': s, 'variant': v, 'cosine': c, 'norm_ratio': 0.5} for s, v, c in
          ((0, 'jvp', 1.0), (250, 'jvp', 0.999), (0, 'paper', -0.25))]
  table = mpl_ablation.fidelity_table(rows).splitlines()
  assert table[0] == '| feedback | step 0 | step 250 |'
  assert table[2] == '| jvp | 1.000 / 0.5 | 0.999 / 0.5 |'
  assert table[3] == '| paper | -0.250 / 0.5 |  |'
