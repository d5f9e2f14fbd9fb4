"""VAT + VAdD: the adversarial mask against a brute-force search, the step, the config errors."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semimeta_jax import methods
from semimeta_jax import models
from semimeta_jax import validation
from semimeta_jax.methods import augment
from semimeta_jax.methods import common
from semimeta_jax.methods import vadd
from semimeta_jax.methods import vat
from tests import numpy_reference
from tests.conftest import synthetic_batch, tiny_config

DIM = 6


def numpy_divergence(mask, features, kernel, bias, target_logits):
  """Per-example KL(softmax(head(mask * h)) || softmax(target)) in float64."""
  q = numpy_reference.softmax((mask * features) @ kernel + bias)
  p = numpy_reference.softmax(target_logits)
  return np.sum(q * (np.log(q) - np.log(p)), axis=-1)


def brute_force_flips(grad_row, num_flips):
  """The binary mask within `num_flips` flips of all ones that maximises the linearised KL."""
  width = len(grad_row)
  best, best_gain = np.ones(width), 0.0
  for size in range(1, num_flips + 1):
    for dropped in itertools.combinations(range(width), size):
      candidate = np.ones(width)
      candidate[list(dropped)] = 0.0
      gain = grad_row @ (candidate - 1.0)
      if gain > best_gain:
        best, best_gain = candidate, gain
  return best


@pytest.mark.parametrize('num_flips', [1, 2, 5])
def test_the_mask_is_the_brute_force_maximiser_of_the_linearised_divergence(num_flips):
  with jax.enable_x64(True):
    keys = jax.random.split(jax.random.key(0), 4)
    features = np.asarray(jax.random.normal(keys[0], (5, DIM), jnp.float64))
    kernel = np.asarray(jax.random.normal(keys[1], (DIM, 4), jnp.float64))
    bias = np.asarray(0.1 * jax.random.normal(keys[2], (4,), jnp.float64))
    target = np.asarray(jax.random.normal(keys[3], (5, 4), jnp.float64))
    head_fn = lambda mask: vadd.masked_head({'kernel': kernel, 'bias': bias}, jnp.asarray(features), mask)
    mask, grad = jax.jit(vadd.adversarial_mask, static_argnums=(0, 3))(
        head_fn, jnp.asarray(target), jnp.asarray(features), num_flips)
    mask, grad = np.asarray(mask), np.asarray(grad)

    # The gradient at m = 1, by central differences of the numpy divergence (batch mean).
    numeric = np.zeros_like(grad)
    for index in np.ndindex(grad.shape):
      step = np.zeros_like(grad)
      step[index] = 1e-6
      plus = numpy_divergence(1.0 + step, features, kernel, bias, target).mean()
      minus = numpy_divergence(1.0 - step, features, kernel, bias, target).mean()
      numeric[index] = (plus - minus) / 2e-6
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-10)

    for row in range(len(features)):
      binary = brute_force_flips(grad[row], num_flips)
      np.testing.assert_array_equal(mask[row] > 0, binary > 0)
      # The authors' rescaling: the kept units share the dropped ones' weight, the mean stays 1.
      np.testing.assert_allclose(mask[row], binary * DIM / binary.sum(), rtol=1e-12)
      np.testing.assert_allclose(mask[row].mean(), 1.0, rtol=1e-12)
    dropped = np.sum(mask == 0, axis=-1)
    assert np.all(dropped <= num_flips) and dropped.sum() > 0
    if num_flips == 5:
      # Only the flips that raise the divergence (g < 0 for 1 -> 0): fewer than k where fewer qualify.
      np.testing.assert_array_equal(dropped, np.minimum(np.sum(grad < 0, axis=-1), 5))


def test_no_flip_when_k_is_zero():
  mask = vadd.flip(jnp.ones((2, 3)), -jnp.ones((2, 3)), 0)
  np.testing.assert_array_equal(mask, np.ones((2, 3)))


def test_the_vadd_term_is_differentiated_through_both_predictions():
  clean = jax.random.normal(jax.random.key(1), (4, 10))
  masked = jax.random.normal(jax.random.key(2), (4, 10))
  grad_clean, grad_masked = jax.grad(vadd.kl_with_logits, argnums=(0, 1))(clean, masked)
  assert np.any(np.asarray(grad_clean) != 0) and np.any(np.asarray(grad_masked) != 0)
  expected = numpy_reference.kl(numpy_reference.softmax(clean), numpy_reference.softmax(masked))
  np.testing.assert_allclose(float(vadd.kl_with_logits(clean, masked)), expected, rtol=1e-5)


def _config(**overrides):
  return tiny_config(method='vat_vadd', **{'vat.xi': 0.0, 'vat.entropy_weight': 1.0, 'vadd.delta': 0.5,
                                           'vadd.weight': 0.7, 'consistency_rampup': 'linear',
                                           'consistency_rampup_steps': 2, 'consistency_weight': 1.6,
                                           **overrides})


@pytest.mark.slow
def test_the_step_traces_once_and_adds_lambda_times_the_masked_kl():
  config = _config()
  model = models.get_model(config, 10)
  state = methods.init_train_state(config, model, (8, 8, 1), jax.random.key(0))
  batch = synthetic_batch(jax.random.key(3))
  chex.clear_trace_counter()
  step = jax.jit(chex.assert_max_traces(lambda s, b: methods.make_train_step(config, 10)(s, b), n=1))
  state, first = step(state, batch)
  # Step 0: lambda is 0 and the VAT term already at its full weight 1.6 (the authors' combined
  # loss ramps lambda only).
  assert float(first['vadd_weight']) == 0.0
  np.testing.assert_allclose(float(first['consistency_weight']), 1.6, rtol=1e-7)
  next_state, metrics = step(state, batch)  # Step 1: lambda = 0.7 / 2, the VAT weight still 1.6.
  np.testing.assert_allclose(float(metrics['consistency_weight']), 1.6, rtol=1e-7)
  step(next_state, batch)

  # The same step's VAT part, and the VAdD term rebuilt from its pieces.
  vat_loss = jax.jit(lambda s: vat.objective(s.params, s, batch, weight=1.6, config=config)[0])(state)

  @jax.jit
  def rebuilt(s):
    _, (stats, *_, clean) = vat.objective(s.params, s, batch, weight=0.0, config=config)
    view = augment.from_config(config)(s.step_key(common.NOISE, vadd.SECOND_VIEW), batch['unlabeled']['image'])
    _, features, _ = common.train_forward_with_features(s, s.params, view, stats,
                                                        s.step_key(common.DROPOUT_TEACHER))
    return clean, features, s.params['head']['fc']

  clean, features, fc = jax.tree.map(lambda a: np.asarray(a, np.float64), rebuilt(state))
  num_flips = int(0.5 * features.shape[-1])
  # The mask by brute force over the flips of the linearised KL, its gradient by central differences.
  grad = np.zeros_like(features)
  for index in np.ndindex(features.shape):
    step_mask = np.zeros_like(features)
    step_mask[index] = 1e-5
    grad[index] = (numpy_divergence(1 + step_mask, features, fc['kernel'], fc['bias'], clean).mean()
                   - numpy_divergence(1 - step_mask, features, fc['kernel'], fc['bias'], clean).mean()) / 2e-5
  binary = np.stack([brute_force_flips(row, num_flips) for row in grad])
  assert np.sum(binary == 0) > 0
  mask = binary * binary.shape[-1] / binary.sum(-1, keepdims=True)
  masked = numpy_reference.softmax((mask * features) @ fc['kernel'] + fc['bias'])
  expected_vadd = numpy_reference.kl(numpy_reference.softmax(clean), masked)
  np.testing.assert_allclose(float(metrics['vadd_loss']), expected_vadd, rtol=1e-4)
  np.testing.assert_allclose(float(metrics['vadd_weight']), 0.35, rtol=1e-6)
  np.testing.assert_allclose(float(metrics['loss']), float(vat_loss) + 0.35 * expected_vadd, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['vadd_flipped_units']), np.sum(binary == 0) / len(binary),
                             rtol=1e-6)



@pytest.mark.parametrize('field,value', [('vadd.delta', 0.0), ('vadd.delta', 1.0), ('vadd.delta', 1.5),
                                         ('vadd.weight', -1.0), ('vat.epsilon', 0.0)])
def test_a_bad_vadd_field_is_one_clear_error(field, value):
  with pytest.raises(validation.ConfigError, match=f'config.{field}={value!r}: '):
    validation.validate_config(_config(**{field: value}))


@pytest.mark.parametrize('dataset', ['digits', 'cifar10'])
def test_the_presets_are_the_papers(dataset):
  preset = methods.presets(dataset)['vat_vadd']
  assert preset['method'] == 'vat_vadd'
  assert preset['vadd.weight'] == 1.0 and preset['vadd.delta'] == 0.05
  assert preset['vat.entropy_weight'] == 1.0
  # The authors' combined run: the VAT term unramped at weight 1, eps 8 on CIFAR-10.
  assert preset['consistency_weight'] == 1.0
  assert preset['vat.epsilon'] == {'digits': methods.presets('digits')['vat']['vat.epsilon'],
                                    'cifar10': 8.0}[dataset]
