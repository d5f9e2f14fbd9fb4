"""fast-SWA: cyclic tail schedule, the average of its snapshots, and recomputed batch statistics."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semimeta_jax import methods
from semimeta_jax import models
from semimeta_jax import schedules
from semimeta_jax import state as state_lib
from semimeta_jax import validation
from semimeta_jax.methods import fast_swa
from semimeta_jax.models import layers
from tests.conftest import synthetic_batch, tiny_config

MAIN, CYCLES, CYCLE, EVERY = 4, 2, 4, 2


def swa_config(**overrides):
  return tiny_config(**{'method': 'supervised', 'dropout_rate': 0.0, 'learning_rate': 0.1,
                        'lr_decay_boundaries': (2,), 'num_train_steps': MAIN + CYCLES * CYCLE,
                        'fast_swa.cycles': CYCLES, 'fast_swa.cycle_steps': CYCLE,
                        'fast_swa.average_every_steps': EVERY, 'fast_swa.lr_max': 0.05,
                        'fast_swa.lr_min': 0.001, 'fast_swa.bn_update_batches': 3, **overrides})


def test_the_tail_is_a_cyclic_cosine_after_the_unchanged_main_schedule():
  config = swa_config()
  schedule = methods.learning_rate_schedule(config)
  plain = tiny_config(learning_rate=0.1, lr_decay_boundaries=(2,))
  for t in range(MAIN):
    np.testing.assert_allclose(schedule(t), schedules.learning_rate_schedule(plain)(t), rtol=1e-6)
  for t in range(MAIN, MAIN + CYCLES * CYCLE):
    phase = ((t - MAIN) % CYCLE) / CYCLE
    expected = 0.001 + 0.5 * (0.05 - 0.001) * (1 + np.cos(np.pi * phase))
    np.testing.assert_allclose(schedule(t), expected, rtol=1e-5)


def test_a_cosine_main_schedule_decays_over_the_main_steps_only():
  """The cosine reaches its end at the tail's start, not at num_train_steps (closed form)."""
  warmup = 1
  schedule = methods.learning_rate_schedule(swa_config(lr_schedule='cosine', warmup_steps=warmup))
  for t in range(MAIN):
    progress = max(t - warmup, 0) / (MAIN - warmup)
    expected = 0.1 * t / warmup if t < warmup else 0.1 * 0.5 * (1 + np.cos(np.pi * progress))
    np.testing.assert_allclose(schedule(t), expected, rtol=1e-5, atol=1e-8, err_msg=f't={t}')
  np.testing.assert_allclose(schedule(MAIN), 0.05, rtol=1e-6)  # The first cycle starts at lr_max.


def _traceable(step):
  chex.clear_trace_counter()
  return lambda state, batch: step(state, batch)


def test_the_average_is_the_mean_of_its_snapshots():
  config = swa_config()
  state = methods.init_train_state(config, models.get_model(config, 10), (8, 8, 1), jax.random.key(0))
  step = jax.jit(chex.assert_max_traces(_traceable(methods.make_train_step(config, 10)), n=1))
  snapshots = []
  for t in range(1, config.num_train_steps + 1):
    state, metrics = step(state, synthetic_batch(jax.random.key(t)))
    if t > MAIN and (t - MAIN) % EVERY == 0:  # Every k updates inside the cycles, cycle ends included.
      snapshots.append(jax.tree.map(np.asarray, state.params))
    assert int(metrics['swa_count']) == len(snapshots)
  assert len(snapshots) == CYCLES * CYCLE // EVERY
  mean = jax.tree.map(lambda *p: np.mean(np.stack(p), axis=0), *snapshots)
  chex.assert_trees_all_close(state.extra['fast_swa']['params'], mean, rtol=1e-5, atol=1e-6)


class _BNNet(nn.Module):
  """Dense -> BN -> relu -> Dense -> BN -> Dense, with the project's batch-norm momentum."""

  @nn.compact
  def __call__(self, x, train):
    bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=layers.BN_MOMENTUM,
                                   epsilon=1e-5, name=name)
    h = nn.relu(bn('bn0')(nn.Dense(6, name='dense0')(x.reshape((x.shape[0], -1)))))
    h = bn('bn1')(nn.Dense(5, name='dense1')(h))
    return nn.Dense(3, name='head')(h)


def _by_hand_statistics(variables, images):
  """Each BN layer's batch mean and (biased) variance, from a forward written out in numpy."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables['params'])
  x = np.asarray(images, np.float64).reshape((images.shape[0], -1))
  stats = {}
  h = x @ p['dense0']['kernel'] + p['dense0']['bias']
  stats['bn0'] = {'mean': h.mean(0), 'var': h.var(0)}
  h = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * p['bn0']['scale'] + p['bn0']['bias']
  h = np.maximum(h, 0) @ p['dense1']['kernel'] + p['dense1']['bias']
  stats['bn1'] = {'mean': h.mean(0), 'var': h.var(0)}
  return stats


def test_recomputed_statistics_are_those_of_a_full_pass_over_the_batches():
  config = swa_config()
  model = _BNNet()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  state = state_lib.TrainState.create(apply_fn=model.apply, params=variables['params'],
                                      batch_stats=variables['batch_stats'],
                                      tx=schedules.sgd_with_coupled_weight_decay(config),
                                      rng=jax.random.key(1))
  # Averaged weights that differ from the raw ones, and stale statistics to be replaced.
  shifted = jax.tree.map(lambda a: a + 0.3, state.params)
  stale = jax.tree.map(lambda a: a + 5.0, state.batch_stats)
  state = state.replace(extra={'fast_swa': fast_swa.init_state(config, shifted, stale)})
  batches = [synthetic_batch(jax.random.key(k), batch_size=8) for k in range(3)]
  per_batch = [jax.jit(fast_swa.batch_statistics)(state, b) for b in batches]
  state = fast_swa.with_recomputed_batch_stats(state, per_batch)
  by_hand = [_by_hand_statistics({'params': shifted},
                                 np.concatenate([b['labeled']['image'], b['unlabeled']['image']]))
             for b in batches]
  full_pass = jax.tree.map(lambda *s: np.mean(np.stack(s), axis=0), *by_hand)
  chex.assert_trees_all_close(state.extra['fast_swa']['batch_stats'], full_pass, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('field,value', [('fast_swa.average_every_steps', 3), ('fast_swa.cycles', 5),
                                         ('fast_swa.lr_min', 1.0), ('fast_swa.bn_update_batches', 0)])
def test_a_bad_fast_swa_field_is_named(field, value):
  config = swa_config(**{field: value})
  with pytest.raises(validation.ConfigError, match=f'config.{field}='):
    validation.validate_config(config)
