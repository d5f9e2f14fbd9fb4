"""Learning-rate and consistency-weight schedules against their closed forms.

Every other test runs with `warmup_steps=0` and no boundaries; here the values at
t = 0, warmup - 1, warmup, each boundary and boundary + 1 are pinned, so an
off-by-one warm-up or a dropped boundary fails.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from semimeta_jax import schedules
from tests.conftest import tiny_config

BASE_LR, WARMUP, FACTOR = 0.4, 10, 0.1
BOUNDARIES = (30, 20)  # Unsorted on purpose: their order must not matter.
NUM_STEPS = 50


def step_closed_form(t):
  """Official: base * t / W during warm-up, then base * factor^(#boundaries b with t > b)."""
  if t < WARMUP:
    return BASE_LR * t / WARMUP
  return BASE_LR * FACTOR ** sum(t > b for b in BOUNDARIES)


def cosine_closed_form(t):
  """Linear warm-up from 0, then a half cosine from the peak to 0 at the last step."""
  if t < WARMUP:
    return BASE_LR * t / WARMUP
  progress = min(t - WARMUP, NUM_STEPS - WARMUP) / (NUM_STEPS - WARMUP)
  return BASE_LR * 0.5 * (1.0 + np.cos(np.pi * progress))


def lr_config(schedule, **overrides):
  fields = dict(lr_schedule=schedule, learning_rate=BASE_LR, warmup_steps=WARMUP,
                lr_decay_boundaries=BOUNDARIES, lr_decay_factor=FACTOR, num_train_steps=NUM_STEPS)
  fields.update(overrides)
  return tiny_config(**fields)


# t = 0, warmup - 1, warmup, warmup + 1, each boundary and boundary + 1, the end.
KEY_STEPS = (0, 1, WARMUP - 1, WARMUP, WARMUP + 1, 20, 21, 30, 31, 35, NUM_STEPS - 1, NUM_STEPS)


@pytest.mark.parametrize('schedule, closed_form', [('step', step_closed_form), ('cosine', cosine_closed_form)])
def test_learning_rate_at_the_key_steps(schedule, closed_form):
  fn = jax.jit(schedules.learning_rate_schedule(lr_config(schedule)))
  for t in KEY_STEPS:
    np.testing.assert_allclose(fn(jnp.int32(t)), closed_form(t), rtol=1e-5, atol=1e-8, err_msg=f't={t}')


def test_step_schedule_spot_values():
  """The closed form above, spelt out for the steps that matter most."""
  fn = schedules.learning_rate_schedule(lr_config('step'))
  expected = {0: 0.0, WARMUP - 1: 0.36, WARMUP: 0.4, 20: 0.4, 21: 0.04, 30: 0.04, 31: 0.004}
  for t, value in expected.items():
    np.testing.assert_allclose(fn(t), value, rtol=1e-5, err_msg=f't={t}')


def test_without_warmup_or_boundaries_the_rate_is_constant():
  fn = schedules.learning_rate_schedule(lr_config('step', warmup_steps=0, lr_decay_boundaries=()))
  np.testing.assert_allclose([fn(t) for t in (0, 1, 10**6)], BASE_LR, rtol=1e-6)


def test_unknown_schedule_is_an_error():
  with pytest.raises(ValueError, match='cosine'):
    schedules.learning_rate_schedule(lr_config('linear'))


RAMPUP, WEIGHT = 8, 3.0


@pytest.mark.parametrize('rampup, closed_form', [
    ('linear', lambda t: WEIGHT * min(1.0, t / RAMPUP)),
    ('sigmoid', lambda t: WEIGHT * np.exp(-5.0 * (1.0 - min(1.0, t / RAMPUP)) ** 2)),
])
def test_consistency_weight_ramps_to_its_maximum(rampup, closed_form):
  config = tiny_config(consistency_rampup=rampup, consistency_rampup_steps=RAMPUP, consistency_weight=WEIGHT)
  fn = schedules.consistency_weight_schedule(config)
  for t in (0, 1, RAMPUP // 2, RAMPUP - 1, RAMPUP, RAMPUP + 1, 10 * RAMPUP):
    np.testing.assert_allclose(fn(jnp.int32(t)), closed_form(t), rtol=1e-6, atol=1e-9, err_msg=f't={t}')


def test_consistency_weight_without_rampup_is_constant():
  config = tiny_config(consistency_rampup_steps=0, consistency_weight=WEIGHT)
  fn = schedules.consistency_weight_schedule(config)
  np.testing.assert_allclose([fn(0), fn(7)], WEIGHT)


def test_unknown_rampup_is_an_error():
  config = tiny_config(consistency_rampup='cubic', consistency_rampup_steps=RAMPUP)
  with pytest.raises(ValueError, match='sigmoid'):
    schedules.consistency_weight_schedule(config)(1)


def test_optimizer_is_pytorch_sgd_with_coupled_decay_on_the_schedule():
  """p <- p - lr(t) * m_t with m_t = momentum * m_{t-1} + (g + wd * p), as torch.optim.SGD."""
  momentum, decay = 0.9, 0.05
  config = lr_config('step', momentum=momentum, weight_decay=decay, warmup_steps=2, lr_decay_boundaries=(3,))
  tx = schedules.sgd_with_coupled_weight_decay(config)
  params = {'w': jnp.asarray([1.0, -2.0, 0.5])}
  grads = [np.asarray([0.3, 0.1, -0.2]) * (k + 1) for k in range(6)]
  opt_state = tx.init(params)
  reference, trace = np.asarray(params['w'], np.float64), np.zeros(3)
  lrs = [0.0, 0.2, 0.4, 0.4, 0.04, 0.04]  # Warm-up of 2 steps, decay after step 3.
  for t in range(6):
    updates, opt_state = tx.update({'w': jnp.asarray(grads[t], jnp.float32)}, opt_state, params)
    params = optax.apply_updates(params, updates)
    trace = momentum * trace + grads[t] + decay * reference
    reference = reference - lrs[t] * trace
    np.testing.assert_allclose(params['w'], reference, rtol=1e-5, err_msg=f'step {t}')
