"""fast-SWA: cycles timed from the start of the tail, and the average evaluated with its own statistics.

The main schedule here (5 steps) is not a multiple of the cycle (4) nor of the
averaging period (2), so cycles or snapshots counted from step 0 fall elsewhere.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from semimeta_jax import evaluation
from semimeta_jax import schedules
from semimeta_jax import state as state_lib
from semimeta_jax.methods import fast_swa
from semimeta_jax.methods import options
from tests.conftest import tiny_config

MAIN, CYCLES, CYCLE, EVERY = 5, 2, 4, 2
LR_MAX, LR_MIN = 0.05, 0.001


def swa_config():
  return tiny_config(**{'method': 'supervised', 'learning_rate': 0.1, 'lr_decay_boundaries': (2,),
                        'num_train_steps': MAIN + CYCLES * CYCLE, 'fast_swa.cycles': CYCLES,
                        'fast_swa.cycle_steps': CYCLE, 'fast_swa.average_every_steps': EVERY,
                        'fast_swa.lr_max': LR_MAX, 'fast_swa.lr_min': LR_MIN})


def test_each_cycle_restarts_at_lr_max_counted_from_the_end_of_the_main_schedule():
  config = swa_config()
  schedule = jax.jit(options.learning_rate_schedule(config))
  for t in range(MAIN, config.num_train_steps):
    phase = ((t - MAIN) % CYCLE) / CYCLE
    expected = LR_MIN + 0.5 * (LR_MAX - LR_MIN) * (1 + np.cos(np.pi * phase))
    np.testing.assert_allclose(schedule(t), expected, rtol=1e-5, err_msg=f't={t}')
  restarts = [t for t in range(MAIN, config.num_train_steps) if np.isclose(schedule(t), LR_MAX)]
  assert restarts == [MAIN + c * CYCLE for c in range(CYCLES)]


def test_snapshots_are_taken_every_k_updates_into_the_tail_and_at_every_cycle_end():
  config = swa_config()
  average_now = jax.jit(lambda t: fast_swa.average_now(config, t))
  taken = [t for t in range(config.num_train_steps + 1) if bool(average_now(t))]
  assert taken == list(range(MAIN + EVERY, config.num_train_steps + 1, EVERY))
  cycle_ends = [MAIN + (c + 1) * CYCLE for c in range(CYCLES)]
  assert set(cycle_ends) <= set(taken)


class _BNNet(nn.Module):
  """Dense -> BatchNorm -> Dense: its evaluation output depends on the statistics it is given."""

  @nn.compact
  def __call__(self, x, train):
    h = nn.Dense(6, name='dense0')(x.reshape((x.shape[0], -1)))
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name='bn')(h)
    return nn.Dense(10, name='head')(jnp.tanh(h))


def _numpy_loss_sum(params, stats, images, labels):
  """Summed cross-entropy of the evaluation-mode forward written out in float64 numpy."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  s = jax.tree.map(lambda a: np.asarray(a, np.float64), stats)
  h = np.asarray(images, np.float64).reshape((len(images), -1)) @ p['dense0']['kernel'] + p['dense0']['bias']
  h = (h - s['bn']['mean']) / np.sqrt(s['bn']['var'] + 1e-5) * p['bn']['scale'] + p['bn']['bias']
  logits = np.tanh(h) @ p['head']['kernel'] + p['head']['bias']
  log_probs = logits - logits.max(1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
  return -log_probs[np.arange(len(labels)), labels].sum()


def test_the_average_is_evaluated_with_its_recomputed_statistics_not_the_raw_models():
  model = _BNNet()
  images = jax.random.normal(jax.random.key(0), (12, 4, 4, 1))
  labels = np.asarray(jax.random.randint(jax.random.key(1), (12,), 0, 10))
  variables = model.init(jax.random.key(2), images, train=False)
  state = state_lib.TrainState.create(apply_fn=model.apply, params=variables['params'],
                                      batch_stats=variables['batch_stats'],
                                      tx=schedules.sgd_with_coupled_weight_decay(swa_config()),
                                      rng=jax.random.key(3))
  state = state.replace(extra={fast_swa.NAME: fast_swa.init_state(None, state.params, state.batch_stats)})
  # Raw and averaged weights, and their statistics, all different.
  raw_stats = {'bn': {'mean': jnp.full((6,), -1.0), 'var': jnp.full((6,), 0.2)}}
  swa_params = jax.tree.map(lambda a: a * 4.0 + 0.1, state.params)
  swa_stats = {'bn': {'mean': jnp.linspace(-0.5, 0.5, 6), 'var': jnp.linspace(0.5, 3.0, 6)}}
  average = dict(state.extra[fast_swa.NAME], params=swa_params, batch_stats=swa_stats)
  state = state.replace(batch_stats=raw_stats, extra={fast_swa.NAME: average})
  (weight_set,) = fast_swa.weight_sets(swa_config())
  batch = {'image': images, 'label': jnp.asarray(labels), 'mask': jnp.ones(12, bool)}
  sums = jax.jit(lambda s, b: evaluation.eval_step(s, b, select=weight_set.select))(state, batch)
  expected = _numpy_loss_sum(swa_params, swa_stats, images, labels)
  with_raw_stats = _numpy_loss_sum(swa_params, raw_stats, images, labels)
  assert abs(expected - with_raw_stats) > 0.1 * abs(expected), (expected, with_raw_stats)  # Tellable apart.
  np.testing.assert_allclose(float(sums['loss_sum']), expected, rtol=1e-5)
  raw = jax.jit(evaluation.eval_step)(state, batch)
  np.testing.assert_allclose(float(raw['loss_sum']),
                             _numpy_loss_sum(state.params, raw_stats, images, labels), rtol=1e-5)
