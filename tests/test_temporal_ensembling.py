"""Temporal Ensembling: the ensemble is the bias-corrected EMA of each example's predictions."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semimeta_jax import methods
from semimeta_jax import models
from semimeta_jax import validation
from semimeta_jax.methods import temporal_ensembling as te
from tests import numpy_reference
from tests.conftest import synthetic_batch, tiny_config
from tests.tiny_net import tiny_state

MOMENTUM = 0.6


def reference_targets(history, num_train, num_classes, momentum):
  """The paper's target, recomputed from the list of predictions each example received.

  z~_i = (1 - a) sum_k a^(n - 1 - k) z_k / (1 - a^n) over its n predictions in order.
  """
  seen = {}
  for indices, predictions in history:
    for i, z in zip(indices, predictions):
      seen.setdefault(int(i), []).append(np.asarray(z, np.float64))
  out, has = np.zeros((num_train, num_classes)), np.zeros(num_train, bool)
  for i, zs in seen.items():
    n = len(zs)
    ema = sum((1 - momentum) * momentum ** (n - 1 - k) * z for k, z in enumerate(zs))
    out[i], has[i] = ema / (1 - momentum ** n), True
  return out, has


def test_ensemble_is_the_bias_corrected_ema_even_with_repeated_indices():
  num_train, num_classes = 7, 3
  extra = te.init_extra_state(None, num_train=num_train, num_classes=num_classes)
  update = jax.jit(lambda e, i, z: te.update_ensemble(e, i, z, MOMENTUM))
  rng = np.random.default_rng(0)
  # Batches with an index twice or three times (an epoch boundary, overlapping pools).
  batches = [np.array([0, 1, 2, 1]), np.array([3, 3, 3, 4]), np.array([1, 5, 0, 1]), np.array([6, 2, 2, 0])]
  history = []
  for indices in batches:
    predictions = rng.dirichlet(np.ones(num_classes), size=len(indices)).astype(np.float32)
    extra = update(extra, jnp.asarray(indices), jnp.asarray(predictions))
    history.append((indices, predictions))
  expected, has = reference_targets(history, num_train, num_classes, MOMENTUM)
  got, got_has = te.targets(extra, jnp.arange(num_train), MOMENTUM)
  np.testing.assert_array_equal(np.asarray(got_has), has)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
  counts = np.bincount(np.concatenate(batches), minlength=num_train)
  np.testing.assert_array_equal(np.asarray(extra['visits']), counts)


@pytest.mark.slow
def test_the_startup_correction_makes_a_constant_prediction_its_own_target():
  extra = te.init_extra_state(None, num_train=2, num_classes=3)
  z = jnp.array([[0.2, 0.5, 0.3]])
  for visits in range(1, 5):
    extra = te.update_ensemble(extra, jnp.array([1]), z, MOMENTUM)
    target, has = te.targets(extra, jnp.array([0, 1]), MOMENTUM)
    np.testing.assert_allclose(target[1], z[0], rtol=1e-6)  # Not (1 - a^t) z: unbiased at once.
    assert not has[0] and has[1] and int(extra['visits'][1]) == visits


def _traceable(step):
  chex.clear_trace_counter()
  return lambda state, batch: step(state, batch)


@pytest.mark.slow
def test_step_trains_traces_once_and_keeps_the_ensemble_of_its_predictions():
  config = tiny_config(method='temporal_ensembling', dropout_rate=0.0, learning_rate=0.1,
                       consistency_rampup='sigmoid', consistency_rampup_steps=4, consistency_weight=3.0,
                       **{'perturb.max_translation': 1, 'temporal_ensembling.momentum': MOMENTUM})
  num_train = 40
  model = models.get_model(config, 10)
  state = methods.init_train_state(config, model, (8, 8, 1), jax.random.key(0), num_train=num_train,
                                   num_classes=10)
  batch = synthetic_batch(jax.random.key(1))
  indices = np.concatenate([batch['labeled']['index'], batch['unlabeled']['index']])
  step = jax.jit(chex.assert_max_traces(_traceable(methods.make_train_step(config, 10)), n=1))
  predict = jax.jit(lambda s: jax.nn.softmax(te.objective(
      s.params, s, jnp.concatenate([batch['labeled']['image'], batch['unlabeled']['image']]),
      batch['labeled']['label'], jnp.zeros((32, 10)), jnp.zeros(32, bool), weight=0.0,
      config=config)[1][3]))
  history, losses = [], []
  for _ in range(25):
    history.append((indices, np.asarray(predict(state))))  # This step's view, recomputed.
    state, metrics = step(state, batch)
    losses.append(float(metrics['supervised_loss']))
    if len(losses) == 1:
      assert float(metrics['consistency_loss']) == 0.0  # No example had a target yet.
    else:
      assert float(metrics['consistency_loss']) > 0 and float(metrics['ensemble_coverage']) == 1.0
  assert np.mean(losses[-5:]) < 0.75 * losses[0], losses
  expected, has = reference_targets(history, num_train, 10, MOMENTUM)
  got, got_has = te.targets(state.extra, jnp.arange(num_train), MOMENTUM)
  np.testing.assert_array_equal(np.asarray(got_has), has)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('field,value', [('temporal_ensembling.momentum', 1.0),
                                         ('perturb.max_translation', -1)])
def test_a_bad_temporal_ensembling_field_is_named(field, value):
  with pytest.raises(validation.ConfigError, match=f'config.{field}='):
    validation.validate_config(tiny_config(method='temporal_ensembling', **{field: value}))


def test_the_loss_is_the_ce_plus_the_weighted_class_averaged_squared_error_over_the_batch():
  """The objective's value against numpy: (z - z~)^2 averaged over classes, divided by the batch."""
  config = tiny_config(method='temporal_ensembling', dropout_rate=0.0, input_noise_std=0.0,
                       max_translation=0, perturb_flip=False)
  state = tiny_state(config)
  batch = synthetic_batch(jax.random.key(3), batch_size=6)
  images = jnp.concatenate([batch['labeled']['image'], batch['unlabeled']['image']])
  labels = batch['labeled']['label']
  rng = np.random.default_rng(1)
  ensemble_targets = rng.dirichlet(np.full(10, 0.3), size=12).astype(np.float32)
  has_target = np.array([True, False, True, True, False, True] * 2)
  weight = 2.5
  objective = jax.jit(functools.partial(te.objective, weight=weight, config=config))
  loss, (_, supervised, consistency, _) = objective(
      state.params, state, images, labels, jnp.asarray(ensemble_targets), jnp.asarray(has_target))
  logits = numpy_reference.train_mode_logits(state, state.params, images)
  squared = np.mean((numpy_reference.softmax(logits) - ensemble_targets) ** 2, axis=-1)
  expected_consistency = np.sum(squared[has_target]) / len(images)  # The batch, not the targets.
  expected_supervised = numpy_reference.cross_entropy(logits[:len(labels)], labels)
  np.testing.assert_allclose(float(consistency), expected_consistency, rtol=1e-5)
  np.testing.assert_allclose(float(supervised), expected_supervised, rtol=1e-5)
  np.testing.assert_allclose(float(loss), expected_supervised + weight * expected_consistency, rtol=1e-5)
