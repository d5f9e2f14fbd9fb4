"""The hypergradient estimators against float64 references and the official-code vectors."""

import functools
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semimeta_jax.methods import hypergrad

PARITY_FILE = pathlib.Path(__file__).resolve().parent / 'data' / 'semimeta_reference_mlp.npz'
# Modes equal to the K = 1 exact hypergradient in evaluation mode (neumann with K = 1).
EXACT_MODES = ('exact', 'first_order', 'jvp', 'neumann')
# `implicit` is the K -> infinity limit, on another scale than the official K = 1 update.
ONE_STEP_MODES = tuple(mode for mode in hypergrad.MODES if mode != 'implicit')


@pytest.fixture(autouse=True)
def float64():
  with jax.enable_x64(True):
    yield


def mlp_apply(params, x):
  """The parity network: Dense(6 -> 8) -> tanh -> Dense(8 -> 4)."""
  hidden = jnp.tanh(x @ params['kernel1'] + params['bias1'])
  return hidden @ params['kernel2'] + params['bias2']


def random_problem(seed=0, num_labeled=5, num_unlabeled=7):
  keys = jax.random.split(jax.random.key(seed), 8)
  params = {
      'kernel1': jax.random.normal(keys[0], (6, 8)) * 0.8,
      'bias1': jax.random.normal(keys[1], (8,)) * 0.3,
      'kernel2': jax.random.normal(keys[2], (8, 4)) * 0.8,
      'bias2': jax.random.normal(keys[3], (4,)) * 0.3,
  }
  x_l = jax.random.normal(keys[4], (num_labeled, 6))
  y_l = jax.random.randint(keys[5], (num_labeled,), 0, 4)
  x_u = jax.random.normal(keys[6], (num_unlabeled, 6))
  # Pseudo-labels that are *not* the network's predictions, so theta~ != theta.
  pseudo = jax.nn.softmax(2.0 * jax.random.normal(keys[7], (num_unlabeled, 4)))
  return params, x_l, y_l, x_u, pseudo


def independent_bilevel_objective(pseudo, params, x_l, y_l, x_u, alpha, inner_steps):
  """ytil -> L_l(theta~(ytil)), written without the project's hypergradient code."""

  def unlabeled_loss(p):
    probs = jax.nn.softmax(mlp_apply(p, x_u))
    return jnp.sum((probs - pseudo) ** 2) / x_u.shape[0]

  for _ in range(inner_steps):
    grads = jax.grad(unlabeled_loss)(params)
    params = {k: params[k] - alpha * grads[k] for k in params}
  log_probs = jax.nn.log_softmax(mlp_apply(params, x_l))
  return -jnp.mean(log_probs[jnp.arange(x_l.shape[0]), y_l])


def central_difference_gradient(fn, y, h=1e-6):
  y = np.asarray(y)
  grad = np.zeros_like(y)
  for index in np.ndindex(*y.shape):
    step = np.zeros_like(y)
    step[index] = h
    grad[index] = (fn(y + step) - fn(y - step)) / (2 * h)
  return grad


def relative_error(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.fixture(scope='module')
def parity():
  data = np.load(PARITY_FILE)
  # Numpy, not jnp: module fixtures run outside the float64 context.
  params = {k: data[k] for k in ('kernel1', 'bias1', 'kernel2', 'bias2')}
  return data, params


class TestOfficialParity:

  def test_initial_pseudo_labels_are_the_predictions(self, parity):
    data, params = parity
    predictions = jax.nn.softmax(mlp_apply(params, data['x_unlabeled']))
    np.testing.assert_allclose(predictions, data['pseudo_init'], atol=1e-12)

  def test_finite_difference_direction_and_update(self, parity):
    data, params = parity
    lr = float(data['lr'])
    direction = hypergrad.finite_difference_direction(
        mlp_apply, params, data['x_labeled'], data['y_labeled'], data['x_unlabeled'],
        data['pseudo_init'], alpha=lr, epsilon=float(data['epsilon']))
    np.testing.assert_allclose(direction, data['fd_direction'], atol=1e-10, rtol=0)
    official_step = hypergrad.update_pseudo_labels(jnp.asarray(data['pseudo_init']), direction, beta=lr)
    np.testing.assert_allclose(official_step, data['pseudo_updated'], atol=1e-10, rtol=0)

  @pytest.mark.parametrize('mode', EXACT_MODES)
  def test_exact_modes_match_the_reference_hypergradient(self, parity, mode):
    data, params = parity
    grad = hypergrad.hypergradient(
        mode, mlp_apply, params, data['x_labeled'], data['y_labeled'], data['x_unlabeled'],
        data['pseudo_init'], alpha=float(data['lr']))
    np.testing.assert_allclose(grad, data['exact_hypergrad'], atol=1e-10, rtol=0)

  @pytest.mark.parametrize('mode', ONE_STEP_MODES)
  def test_default_meta_lr_reproduces_the_official_update(self, parity, mode):
    data, params = parity
    lr, batch = float(data['lr']), data['x_unlabeled'].shape[0]
    alpha = lr  # The default inner learning rate is the current learning rate.
    grad = hypergrad.hypergradient(
        mode, mlp_apply, params, data['x_labeled'], data['y_labeled'], data['x_unlabeled'],
        data['pseudo_init'], alpha=alpha, epsilon=float(data['epsilon']))
    beta = hypergrad.official_meta_lr(lr, alpha, batch)
    updated = hypergrad.update_pseudo_labels(jnp.asarray(data['pseudo_init']), grad, beta=beta)
    np.testing.assert_allclose(updated, data['pseudo_updated'], atol=1e-6, rtol=0)


class TestEstimators:

  def test_at_predictions_the_exact_modes_agree(self):
    params, x_l, y_l, x_u, _ = random_problem(seed=1)
    predictions = jax.nn.softmax(mlp_apply(params, x_u))
    grads = {mode: hypergrad.hypergradient(mode, mlp_apply, params, x_l, y_l, x_u, predictions, alpha=0.3)
             for mode in EXACT_MODES}
    chex.assert_trees_all_close(grads['first_order'], grads['exact'], atol=1e-10, rtol=0)
    chex.assert_trees_all_close(grads['jvp'], grads['exact'], atol=1e-10, rtol=0)
    skipped = hypergrad.jvp(mlp_apply, params, x_l, y_l, x_u, predictions, alpha=0.3,
                            theta_tilde_is_theta=True)
    chex.assert_trees_all_close(skipped, grads['exact'], atol=1e-10, rtol=0)

  @pytest.mark.parametrize('epsilon', [1e-1, 1e-2])
  def test_finite_difference_approaches_jvp_with_epsilon(self, epsilon):
    params, x_l, y_l, x_u, _ = random_problem(seed=2)
    predictions = jax.nn.softmax(mlp_apply(params, x_u))
    reference = hypergrad.jvp(mlp_apply, params, x_l, y_l, x_u, predictions, alpha=0.3)
    estimate = hypergrad.finite_difference(mlp_apply, params, x_l, y_l, x_u, predictions, alpha=0.3,
                                           epsilon=epsilon)
    error = relative_error(estimate, reference)
    assert error < epsilon, error
    assert error > 0.0  # A central difference is not exact: the check can fail.

  def test_jvp_is_exact_for_any_pseudo_labels(self):
    params, x_l, y_l, x_u, pseudo = random_problem(seed=3)
    exact = hypergrad.exact(mlp_apply, params, x_l, y_l, x_u, pseudo, alpha=0.5)
    forward = hypergrad.jvp(mlp_apply, params, x_l, y_l, x_u, pseudo, alpha=0.5)
    chex.assert_trees_all_close(forward, exact, atol=1e-12, rtol=1e-10)

  @pytest.mark.parametrize('inner_steps', [1, 2])
  def test_exact_passes_a_gradient_check_of_the_whole_objective(self, inner_steps):
    params, x_l, y_l, x_u, pseudo = random_problem(seed=4)
    alpha = 0.5
    objective = jax.jit(functools.partial(
        independent_bilevel_objective, params=params, x_l=x_l, y_l=y_l, x_u=x_u, alpha=alpha,
        inner_steps=inner_steps))
    numeric = central_difference_gradient(lambda y: float(objective(y)), pseudo)
    analytic = hypergrad.exact(mlp_apply, params, x_l, y_l, x_u, pseudo, alpha=alpha,
                               inner_steps=inner_steps)
    np.testing.assert_allclose(analytic, numeric, atol=1e-9, rtol=1e-6)

  @pytest.mark.parametrize('inner_steps', [1, 2])
  def test_first_order_differs_from_exact_away_from_predictions(self, inner_steps):
    params, x_l, y_l, x_u, pseudo = random_problem(seed=5)
    exact = hypergrad.exact(mlp_apply, params, x_l, y_l, x_u, pseudo, alpha=0.5, inner_steps=inner_steps)
    approx = hypergrad.first_order(mlp_apply, params, x_l, y_l, x_u, pseudo, alpha=0.5)
    assert relative_error(approx, exact) > 1e-2

  def test_inner_steps_change_the_exact_hypergradient(self):
    params, x_l, y_l, x_u, pseudo = random_problem(seed=6)
    one = hypergrad.exact(mlp_apply, params, x_l, y_l, x_u, pseudo, alpha=0.5, inner_steps=1)
    two = hypergrad.exact(mlp_apply, params, x_l, y_l, x_u, pseudo, alpha=0.5, inner_steps=2)
    assert relative_error(two, one) > 1e-3

  def test_zero_labeled_gradient_gives_zero_direction(self):
    params, x_l, _, x_u, pseudo = random_problem(seed=7)
    zero_fn = lambda p, x: 0.0 * mlp_apply(p, x)  # Constant logits: grad L_l = 0.
    direction = hypergrad.finite_difference_direction(zero_fn, params, x_l, jnp.zeros(5, jnp.int32), x_u,
                                                      pseudo, alpha=0.1, epsilon=1e-2)
    assert np.all(np.isfinite(direction))
    np.testing.assert_array_equal(direction, 0.0)

  @pytest.mark.parametrize('mode', hypergrad.MODES)
  def test_every_mode_jits_and_runs_in_float32(self, mode):
    with jax.enable_x64(False):
      params, x_l, y_l, x_u, pseudo = jax.tree.map(
          lambda a: a.astype(jnp.float32) if a.dtype == jnp.float64 else a, random_problem(seed=8))
      fn = jax.jit(functools.partial(hypergrad.hypergradient, mode, mlp_apply, inner_steps=2))
      grad = fn(params, x_l, y_l, x_u, pseudo, alpha=jnp.float32(0.1))
      chex.assert_shape(grad, pseudo.shape)
      chex.assert_type(grad, jnp.float32)
      chex.assert_tree_all_finite(grad)

  def test_unknown_mode_is_an_error(self):
    params, x_l, y_l, x_u, pseudo = random_problem()
    with pytest.raises(ValueError, match='exact'):
      hypergrad.hypergradient('second_order', mlp_apply, params, x_l, y_l, x_u, pseudo, alpha=0.1)


class TestProjections:

  def test_simplex_projection_matches_a_bisection_reference(self):
    y = np.asarray(jax.random.normal(jax.random.key(0), (50, 6))) * 0.7
    projected = np.asarray(hypergrad.simplex_projection(jnp.asarray(y)))
    for row, out in zip(y, projected):
      lo, hi = row.min() - 1.0, row.max()
      for _ in range(200):  # The threshold tau solves sum(relu(row - tau)) = 1.
        tau = 0.5 * (lo + hi)
        lo, hi = (tau, hi) if np.maximum(row - tau, 0).sum() > 1 else (lo, tau)
      np.testing.assert_allclose(out, np.maximum(row - tau, 0), atol=1e-9)
    np.testing.assert_allclose(projected.sum(-1), 1.0, atol=1e-12)
    assert projected.min() >= 0.0

  def test_optax_projection_equals_the_former_sort_based_one(self):
    """optax's projection replaced this project's sort-based formula: same numbers."""
    y = jnp.asarray(np.asarray(jax.random.normal(jax.random.key(2), (200, 10))) * 0.7)
    sorted_desc = -jnp.sort(-y, axis=-1)
    cumulative = jnp.cumsum(sorted_desc, axis=-1) - 1.0
    ranks = jnp.arange(1, y.shape[-1] + 1, dtype=y.dtype)
    rho = jnp.sum(sorted_desc - cumulative / ranks > 0, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(cumulative, rho - 1, axis=-1) / rho.astype(y.dtype)
    np.testing.assert_allclose(hypergrad.simplex_projection(y), jax.nn.relu(y - threshold),
                               rtol=0, atol=1e-12)

  def test_simplex_projection_keeps_distributions(self):
    dist = jax.nn.softmax(jax.random.normal(jax.random.key(1), (10, 5)))
    np.testing.assert_allclose(hypergrad.simplex_projection(dist), dist, atol=1e-12)

  def test_relu_normalize_is_the_official_projection_with_a_safe_zero_row(self):
    pseudo = jnp.asarray([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    stepped = jnp.asarray([[0.6, -0.2, 0.2], [-0.1, -0.3, -0.5]])
    out = hypergrad.relu_normalize(stepped, fallback=pseudo)
    np.testing.assert_allclose(out[0], [0.75, 0.0, 0.25])
    np.testing.assert_allclose(out[1], pseudo[1])  # All-zero row keeps its pseudo-label.
