"""VAT: the adversarial direction is the dominant eigenvector of the KL's Hessian; the step trains."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semimeta_jax import methods
from semimeta_jax import validation
from semimeta_jax.methods import common
from semimeta_jax.methods import vat
from tests import numpy_reference
from tests.conftest import synthetic_batch, tiny_config
from tests.tiny_net import tiny_state


class _MLP(nn.Module):
  """Per-example network (no batch norm), so each example's KL Hessian is its own block."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(12, param_dtype=jnp.float64)(x.reshape((x.shape[0], -1))))
    return nn.Dense(4, param_dtype=jnp.float64)(h)


@pytest.mark.slow
@pytest.mark.parametrize('xi', [1e-6, 0.0], ids=['finite_difference', 'exact_hvp'])
def test_power_iteration_finds_the_dominant_eigenvector_of_the_kl_hessian(xi):
  with jax.enable_x64(True):
    model = _MLP()
    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 1), jnp.float64)
    params = model.init(jax.random.key(1), x)
    logits_fn = lambda inputs: model.apply(params, inputs)
    clean = logits_fn(x)
    direction = jax.jit(lambda key: vat.adversarial_direction(
        logits_fn, x, clean, key, xi=xi, power_iterations=60))(jax.random.key(2))
    for i in range(x.shape[0]):
      # The reference: KL(p(x_i) || p(x_i + r)) written out here, its Hessian at r = 0
      # by jax.hessian, its top eigenvector by numpy.
      p = jax.nn.softmax(clean[i])

      def kl(r, i=i, p=p):
        log_q = jax.nn.log_softmax(logits_fn((x[i] + r.reshape(x.shape[1:]))[None])[0])
        return jnp.sum(p * (jnp.log(p) - log_q))

      hessian = np.asarray(jax.hessian(kl)(jnp.zeros(x[i].size, jnp.float64)))
      eigenvalues, eigenvectors = np.linalg.eigh(hessian)
      assert eigenvalues[-1] > 1.5 * eigenvalues[-2] > 0  # A gap, so the test can tell.
      found = np.asarray(direction[i]).ravel()
      np.testing.assert_allclose(np.linalg.norm(found), 1.0, rtol=1e-9)
      np.testing.assert_allclose(abs(found @ eigenvectors[:, -1]), 1.0, atol=1e-6)


def test_the_clean_prediction_receives_no_gradient():
  clean = jax.random.normal(jax.random.key(3), (5, 10))
  perturbed = jax.random.normal(jax.random.key(4), (5, 10))
  grad_clean, grad_perturbed = jax.grad(vat.kl_to_clean, argnums=(0, 1))(clean, perturbed)
  assert np.all(np.asarray(grad_clean) == 0)
  assert np.any(np.asarray(grad_perturbed) != 0)


def _traceable(step):
  chex.clear_trace_counter()
  return lambda state, batch: step(state, batch)


def test_vat_ent_step_trains_traces_once_and_adds_its_terms():
  # The exact Hessian-vector product (vat_xi = 0): at the default xi = 1e-6 the direction is
  # float32 rounding noise (see vat.py), and 20 steps of ConvLarge with it ended anywhere between
  # 0.65 and 0.85 of the first loss, depending on the CPU's rounding. The small network fits the
  # batch far below the threshold whatever the rounding; the terms' values are pinned by the
  # numpy tests below.
  config = tiny_config(method='vat', dropout_rate=0.0, learning_rate=0.1, consistency_weight=1.0,
                       **{'vat.epsilon': 1.0, 'vat.xi': 0.0, 'vat.entropy_weight': 1.0})
  state = tiny_state(config)
  batch = synthetic_batch(jax.random.key(5))
  step = jax.jit(chex.assert_max_traces(_traceable(methods.make_train_step(config, 10)), n=1))
  # Only the labeled forward moves the running averages; the unlabeled ones leave them alone.
  labeled_stats = jax.jit(lambda s: common.train_forward(
      s, s.params, batch['labeled']['image'], s.batch_stats, s.step_key(common.DROPOUT_LABELED))[1])(state)
  history = []
  for _ in range(20):
    state, metrics = step(state, batch)
    history.append(jax.tree.map(float, metrics))
    if len(history) == 1:
      chex.assert_trees_all_close(state.batch_stats, labeled_stats, rtol=1e-6)
  assert history[-1]['supervised_loss'] < 0.5 * history[0]['supervised_loss'], history
  for m in history:
    assert m['consistency_loss'] > 0 and m['entropy_loss'] > 0
    np.testing.assert_allclose(m['loss'], m['supervised_loss'] + m['consistency_loss'] + m['entropy_loss'],
                               rtol=1e-5)


@pytest.mark.parametrize('field,value', [('vat.epsilon', 0.0), ('vat.xi', -1.0),
                                         ('vat.power_iterations', 0), ('vat.entropy_weight', -1.0)])
def test_a_bad_vat_field_is_named(field, value):
  with pytest.raises(validation.ConfigError, match=f'config.{field}='):
    validation.validate_config(tiny_config(method='vat', **{field: value}))


def test_the_lds_is_the_kl_from_the_clean_to_the_perturbed_prediction():
  clean = 2.0 * jax.random.normal(jax.random.key(6), (7, 10))
  perturbed = 2.0 * jax.random.normal(jax.random.key(7), (7, 10))
  p, q = numpy_reference.softmax(clean), numpy_reference.softmax(perturbed)
  forward, backward = numpy_reference.kl(p, q), numpy_reference.kl(q, p)
  assert abs(forward - backward) > 0.05 * forward, (forward, backward)  # The directions differ here.
  np.testing.assert_allclose(float(jax.jit(vat.kl_to_clean)(clean, perturbed)), forward, rtol=1e-5)


@pytest.mark.parametrize('entropy_weight', [0.0, 0.7], ids=['vat', 'vat_ent'])
def test_the_objective_adds_the_weighted_lds_and_entropy_to_the_ce(entropy_weight):
  """Each term and the total against numpy, along the direction the step computes."""
  config = tiny_config(method='vat', dropout_rate=0.0, **{'vat.epsilon': 2.0, 'vat.xi': 0.0,
                                                          'vat.entropy_weight': entropy_weight})
  state = tiny_state(config)
  batch = synthetic_batch(jax.random.key(8), batch_size=6)
  weight = 1.3
  loss, (_, supervised, lds, entropy, _) = jax.jit(functools.partial(
      vat.objective, state=state, batch=batch, weight=weight, config=config))(state.params)

  x_u = batch['unlabeled']['image']
  forward = lambda x: state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats}, x,
                                     train=True, mutable=['batch_stats'])[0]
  direction = jax.jit(lambda: vat.adversarial_direction(
      forward, x_u, forward(x_u), state.step_key(common.NOISE), xi=0.0, power_iterations=1))()
  logits_l = numpy_reference.train_mode_logits(state, state.params, batch['labeled']['image'])
  clean = numpy_reference.softmax(numpy_reference.train_mode_logits(state, state.params, x_u))
  adversarial = numpy_reference.softmax(numpy_reference.train_mode_logits(
      state, state.params, x_u + config.vat.epsilon * direction))
  expected_supervised = numpy_reference.cross_entropy(logits_l, batch['labeled']['label'])
  expected_lds = numpy_reference.kl(clean, adversarial)
  reverse_lds = numpy_reference.kl(adversarial, clean)
  assert abs(expected_lds - reverse_lds) > 0.02 * expected_lds, (expected_lds, reverse_lds)
  expected_entropy = numpy_reference.entropy(clean)
  np.testing.assert_allclose(float(supervised), expected_supervised, rtol=1e-5)
  np.testing.assert_allclose(float(lds), expected_lds, rtol=1e-4)
  np.testing.assert_allclose(float(entropy), expected_entropy, rtol=1e-5)
  np.testing.assert_allclose(
      float(loss), expected_supervised + weight * expected_lds + entropy_weight * expected_entropy, rtol=1e-5)
