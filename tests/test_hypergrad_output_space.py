"""`neumann` and `implicit` against unrolled `exact`, dense linear algebra and one device."""

import functools

import chex
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

from semimeta_jax import errors
from semimeta_jax.methods import hypergrad
from semimeta_jax.methods import hypergrad_output_space
from semimeta_jax import models
from semimeta_jax import parallel
from semimeta_jax import state as state_lib
from semimeta_jax.methods import semimeta
from tests import conftest
from tests import test_parallel
from tests.conftest import synthetic_batch
from tests.conftest import tiny_config
from tests.test_hypergrad import mlp_apply
from tests.test_hypergrad import random_problem
from tests.test_hypergrad import relative_error


@pytest.fixture(autouse=True)
def float64():
  with jax.enable_x64(True):
    yield


def evaluation_mode_problem(seed):
  """A problem whose pseudo-labels are the network's own predictions: zero residual in L_u."""
  params, x_l, y_l, x_u, _ = random_problem(seed=seed)
  return params, x_l, y_l, x_u, jax.nn.softmax(mlp_apply(params, x_u))


def dense_output_jacobian(params, x_u):
  """J (B_u*C x P) of the stacked softmax outputs, materialised by jacrev: the independent reference."""
  flat, unravel = ravel_pytree(params)
  jacobian = jax.jacrev(lambda f: jax.nn.softmax(mlp_apply(unravel(f), x_u)).ravel())(flat)
  return np.asarray(jacobian)


def flat_labeled_gradient(params, x_l, y_l):
  grads = jax.grad(lambda p: -jnp.mean(jax.nn.log_softmax(mlp_apply(p, x_l))[jnp.arange(len(y_l)), y_l]))(
      params)
  return np.asarray(ravel_pytree(grads)[0])


class TestNeumann:

  @pytest.mark.parametrize('inner_steps', [1, 2, 3, 8])
  @pytest.mark.parametrize('theta_tilde_is_theta', [False, True])
  def test_equals_unrolled_exact_in_evaluation_mode(self, inner_steps, theta_tilde_is_theta):
    params, x_l, y_l, x_u, predictions = evaluation_mode_problem(seed=10)
    exact = hypergrad.exact(mlp_apply, params, x_l, y_l, x_u, predictions, alpha=0.3,
                            inner_steps=inner_steps)
    series = hypergrad.neumann(mlp_apply, params, x_l, y_l, x_u, predictions, alpha=0.3,
                               inner_steps=inner_steps, theta_tilde_is_theta=theta_tilde_is_theta)
    assert relative_error(series, exact) < 1e-12

  def test_more_steps_are_not_a_no_op_in_evaluation_mode(self):
    params, x_l, y_l, x_u, predictions = evaluation_mode_problem(seed=11)
    one, two = (hypergrad.neumann(mlp_apply, params, x_l, y_l, x_u, predictions, alpha=0.1,
                                  inner_steps=k) for k in (1, 2))
    # theta stays put, d theta_K / d ytil does not: g_2 = 2 c J v - c^2 J J^T J v, near twice g_1.
    ratio = float(jnp.linalg.norm(two) / jnp.linalg.norm(one))
    assert 1.5 < ratio < 2.0, ratio

  def test_series_matches_a_dense_numpy_sum(self):
    params, x_l, y_l, x_u, predictions = evaluation_mode_problem(seed=12)
    jacobian, v = dense_output_jacobian(params, x_u), flat_labeled_gradient(params, x_l, y_l)
    c, steps = 2 * 0.4 / x_u.shape[0], 5
    gram = jacobian @ jacobian.T
    reference = c * sum(np.linalg.matrix_power(np.eye(len(gram)) - c * gram, k) for k in range(steps)) @ (
        jacobian @ v)
    series = hypergrad.neumann(mlp_apply, params, x_l, y_l, x_u, predictions, alpha=0.4,
                               inner_steps=steps, theta_tilde_is_theta=True)
    np.testing.assert_allclose(series.ravel(), reference, rtol=1e-10, atol=1e-14)

  def test_one_term_is_exact_for_any_pseudo_labels(self):
    params, x_l, y_l, x_u, pseudo = random_problem(seed=13)  # pseudo != predictions.
    exact = hypergrad.exact(mlp_apply, params, x_l, y_l, x_u, pseudo, alpha=0.5)
    series = hypergrad.neumann(mlp_apply, params, x_l, y_l, x_u, pseudo, alpha=0.5, inner_steps=1)
    chex.assert_trees_all_close(series, exact, atol=1e-12, rtol=1e-10)

  def test_is_only_gauss_newton_with_a_residual(self):
    params, x_l, y_l, x_u, pseudo = random_problem(seed=14)  # Far from the predictions.
    exact = hypergrad.exact(mlp_apply, params, x_l, y_l, x_u, pseudo, alpha=0.1, inner_steps=3)
    series = hypergrad.neumann(mlp_apply, params, x_l, y_l, x_u, pseudo, alpha=0.1, inner_steps=3)
    one_step = hypergrad.jvp(mlp_apply, params, x_l, y_l, x_u, pseudo, alpha=0.1)
    error = relative_error(series, exact)
    # Not equal (the Hessian's residual term is dropped), yet closer than the K = 1 formula.
    assert 1e-4 < error < relative_error(one_step, exact) / 2, error


class TestImplicit:

  def test_damped_solve_equals_a_dense_solve(self):
    params, x_l, y_l, x_u, predictions = evaluation_mode_problem(seed=20)
    jacobian, v = dense_output_jacobian(params, x_u), flat_labeled_gradient(params, x_l, y_l)
    damping = 1e-2
    reference = np.linalg.solve(jacobian @ jacobian.T + damping * np.eye(len(jacobian)), jacobian @ v)
    g = hypergrad.implicit(mlp_apply, params, x_l, y_l, x_u, predictions,
                           cg_iterations=2 * len(jacobian), cg_damping=damping)
    np.testing.assert_allclose(g.ravel(), reference, rtol=1e-7, atol=1e-12)

  def test_vanishing_damping_gives_the_pseudo_inverse(self):
    params, x_l, y_l, x_u, predictions = evaluation_mode_problem(seed=21)
    jacobian, v = dense_output_jacobian(params, x_u), flat_labeled_gradient(params, x_l, y_l)
    gram = jacobian @ jacobian.T
    # Softmax rows sum to one: one null direction per unlabeled example.
    assert np.sum(np.linalg.eigvalsh(gram) < 1e-12) == x_u.shape[0]
    reference = np.linalg.pinv(gram, rcond=1e-10, hermitian=True) @ (jacobian @ v)
    # The damping biases g by about damping / (smallest non-zero eigenvalue, here ~3e-6).
    errors_by_damping = [
        relative_error(hypergrad.implicit(mlp_apply, params, x_l, y_l, x_u, predictions,
                                          cg_iterations=2 * len(jacobian), cg_damping=damping).ravel(),
                       reference)
        for damping in (1e-6, 1e-8, 1e-10)]
    assert errors_by_damping[0] > 10 * errors_by_damping[1] > 100 * errors_by_damping[2], errors_by_damping
    assert errors_by_damping[2] < 1e-4, errors_by_damping

  def test_the_unrolled_hypergradient_tends_to_it(self):
    params, x_l, y_l, x_u, predictions = evaluation_mode_problem(seed=22)
    limit = hypergrad.implicit(mlp_apply, params, x_l, y_l, x_u, predictions, cg_iterations=56,
                               cg_damping=1e-10)
    errors_by_k = [relative_error(hypergrad.neumann(mlp_apply, params, x_l, y_l, x_u, predictions,
                                                    alpha=1.0, inner_steps=k), limit)
                   for k in (1, 10, 100, 1000)]
    assert all(a > b for a, b in zip(errors_by_k, errors_by_k[1:])), errors_by_k

  def test_damping_is_the_proximal_inner_problems_limit(self):
    # (G + mu I)^-1 J v is the implicit hypergradient of argmin L_u + (mu / B_u) ||theta - theta_t||^2:
    # checked against that problem's parameter-space IFT formula and its unrolled descent, K -> oo.
    params, x_l, y_l, x_u, predictions = evaluation_mode_problem(seed=23)
    jacobian, v = dense_output_jacobian(params, x_u), flat_labeled_gradient(params, x_l, y_l)
    batch, damping = x_u.shape[0], 0.2
    hessian = (2 / batch) * jacobian.T @ jacobian + (2 * damping / batch) * np.eye(jacobian.shape[1])
    ift = (2 / batch) * jacobian @ np.linalg.solve(hessian, v)
    flat0, unravel = ravel_pytree(params)

    def labeled_loss_after_descent(y, steps, alpha=1.0):
      def inner(flat):
        residual = jax.nn.softmax(mlp_apply(unravel(flat), x_u)) - y
        return (jnp.sum(residual ** 2) + damping * jnp.sum((flat - flat0) ** 2)) / batch
      flat = jax.lax.fori_loop(0, steps, lambda _, f: f - alpha * jax.grad(inner)(f), flat0)
      logits = mlp_apply(unravel(flat), x_l)
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y_l)), y_l])

    unrolled = jax.grad(labeled_loss_after_descent)(predictions, 800)
    g = hypergrad.implicit(mlp_apply, params, x_l, y_l, x_u, predictions,
                           cg_iterations=2 * len(jacobian), cg_damping=damping)
    np.testing.assert_allclose(g.ravel(), ift, rtol=1e-9, atol=1e-14)
    assert relative_error(unrolled.ravel(), ift) < 1e-10
    # Not a coincidence of the damping: without it the limit moves.
    undamped = hypergrad.implicit(mlp_apply, params, x_l, y_l, x_u, predictions,
                                  cg_iterations=2 * len(jacobian), cg_damping=1e-10)
    assert relative_error(undamped.ravel(), ift) > 1e-2

  def test_conjugate_gradient_stops_safely_after_convergence(self):
    matrix = jnp.diag(jnp.asarray([3.0, 1.0, 0.0]))  # Singular; rhs in its range.
    rhs = jnp.asarray([6.0, 2.0, 0.0])
    x = hypergrad_output_space.conjugate_gradient(lambda w: matrix @ w, rhs, iterations=10)
    np.testing.assert_allclose(x, [2.0, 2.0, 0.0], rtol=1e-14)


class TestCompilation:

  @pytest.mark.parametrize('mode', ['neumann', 'implicit'])
  def test_traces_once_and_runs_in_float32(self, mode):
    chex.clear_trace_counter()  # The counter is keyed by code, shared by both parametrisations.
    with jax.enable_x64(False):
      params, x_l, y_l, x_u, pseudo = jax.tree.map(
          lambda a: a.astype(jnp.float32) if a.dtype == jnp.float64 else a, random_problem(seed=30))

      @jax.jit
      @chex.assert_max_traces(n=1)
      def estimate(params, x_l, y_l, x_u, pseudo, alpha):
        return hypergrad.hypergradient(mode, mlp_apply, params, x_l, y_l, x_u, pseudo, alpha=alpha,
                                       inner_steps=4 if mode == 'neumann' else 1, cg_iterations=6)

      for alpha in (0.1, 0.2):  # A new alpha is a new value, not a new program.
        grad = estimate(params, x_l, y_l, x_u, pseudo, jnp.float32(alpha))
        chex.assert_shape(grad, pseudo.shape)
        chex.assert_type(grad, jnp.float32)
        chex.assert_tree_all_finite(grad)


class TestValidation:

  @pytest.mark.parametrize('field,value,message', [
      ('cg_iterations', 0, 'hypergrad.cg_iterations'),
      ('cg_iterations', -3, 'hypergrad.cg_iterations'),
      ('cg_damping', -1e-3, 'hypergrad.cg_damping'),
  ])
  def test_bad_fields_are_config_errors(self, field, value, message):
    with pytest.raises(errors.ConfigError, match=message):
      semimeta.validate(tiny_config(**{'hypergrad.mode': 'implicit', f'hypergrad.{field}': value}))

  def test_implicit_needs_its_own_meta_lr(self):
    with pytest.raises(errors.ConfigError, match='hypergrad.meta_lr=0.0: must be > 0 with'):
      semimeta.validate(tiny_config(**{'hypergrad.mode': 'implicit'}))
    semimeta.validate(tiny_config(**{'hypergrad.mode': 'implicit', 'hypergrad.meta_lr': 0.5}))

  @pytest.mark.parametrize('mode', hypergrad.MODES)
  def test_only_multi_step_modes_take_several_inner_steps(self, mode):
    config = tiny_config(**{'hypergrad.mode': mode, 'hypergrad.inner_steps': 3})
    if mode in ('exact', 'neumann'):
      semimeta.validate(config)
    else:
      with pytest.raises(errors.ConfigError, match='hypergrad.inner_steps'):
        semimeta.validate(config)


def test_output_jacobian_products_are_transposes():
  params, _, _, x_u, _ = random_problem(seed=40)
  jacobian = dense_output_jacobian(params, x_u)
  probs = lambda p: jax.nn.softmax(mlp_apply(p, x_u))
  jacobian_times, transpose_times = hypergrad_output_space.output_jacobian_products(probs, params)
  u = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape), params)
  w = jnp.sin(jnp.arange(x_u.shape[0] * 4, dtype=jnp.float64)).reshape(x_u.shape[0], 4)
  np.testing.assert_allclose(jacobian_times(u).ravel(), jacobian @ ravel_pytree(u)[0], rtol=1e-12)
  np.testing.assert_allclose(ravel_pytree(transpose_times(w))[0], jacobian.T @ w.ravel(), rtol=1e-12,
                             atol=1e-15)



@pytest.mark.slow
@pytest.mark.parametrize('mode,inner_steps', [('neumann', 3), ('implicit', 1)])
def test_eight_devices_match_one(mode, inner_steps):
  """The estimators on a data-parallel mesh, with batch statistics and dropout in the meta forward."""
  with jax.enable_x64(False):
    config = tiny_config(**{'hypergrad.mode': mode, 'hypergrad.inner_steps': inner_steps,
                            'hypergrad.forward_mode': 'train', 'hypergrad.cg_iterations': 5,
                            'hypergrad.meta_lr': 0.5})
    batch = jax.tree.map(np.asarray, synthetic_batch(jax.random.key(1)))
    state8, metrics8 = test_parallel.one_step(config, parallel.make_mesh(conftest.cpu_devices(8)), batch)
    state1, metrics1 = test_parallel.one_step(config, parallel.make_mesh(conftest.cpu_devices(1)), batch)
    chex.assert_trees_all_close(state8.params, state1.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(metrics8, metrics1, rtol=1e-4, atol=1e-6)
    assert float(metrics1['hypergradient_norm']) > 0


@pytest.mark.slow  # Compiles every model three times: minutes on a CPU.
@pytest.mark.parametrize('model', models.MODEL_NAMES)
def test_every_model_takes_both_estimators(model):
  """On each model (training-mode meta forward), K = 1 of `neumann` is `jvp`; `implicit` is finite."""
  with jax.enable_x64(False):
    config = tiny_config(model=model, model_width=4, **{'hypergrad.forward_mode': 'train',
                                                         'hypergrad.cg_iterations': 3})
    image_shape = (8, 8, 1) if model == 'convlarge_digits' else (32, 32, 1)
    state = state_lib.init_train_state(config, models.get_model(config, 10), image_shape,
                                       jax.random.key(0))
    batch = synthetic_batch(jax.random.key(1), batch_size=4, image_shape=image_shape)
    grads = {}
    for mode in ('jvp', 'neumann', 'implicit'):
      config.hypergrad.mode = mode
      meta = jax.jit(functools.partial(semimeta.meta_pseudo_labels, lr=0.1, key=jax.random.key(2),
                                       config=config.copy_and_resolve_references()))
      _, grads[mode], _ = meta(state, batch['labeled'], batch['unlabeled'])
    chex.assert_trees_all_close(grads['neumann'], grads['jvp'], rtol=1e-4, atol=1e-7)
    chex.assert_tree_all_finite(grads['implicit'])
    assert float(jnp.linalg.norm(grads['implicit'])) > 0


class TestLoopUnroll:

  @pytest.mark.parametrize('mode', ['neumann', 'implicit'])
  def test_unrolled_loops_give_the_rolled_values(self, mode):
    params, x_l, y_l, x_u, predictions = evaluation_mode_problem(seed=40)
    estimate = functools.partial(hypergrad.hypergradient, mode, mlp_apply, params, x_l, y_l, x_u,
                                 predictions, alpha=0.3, inner_steps=5 if mode == 'neumann' else 1,
                                 theta_tilde_is_theta=True, cg_iterations=7)
    rolled = estimate(loop_unroll=1)
    # 3 does not divide 4 terms or 7 CG steps: the remainder iterations run too; 0 is all.
    for unroll in (3, 8, 0):
      chex.assert_trees_all_close(estimate(loop_unroll=unroll), rolled, rtol=1e-12, atol=1e-16)

  def test_unrolled_virtual_steps_give_the_rolled_endpoint(self):
    params, x_l, y_l, x_u, pseudo = random_problem(seed=41)
    loss = lambda p: hypergrad.inner_loss(p, mlp_apply, x_u, pseudo)
    rolled, unrolled = (hypergrad_output_space.gradient_descent_endpoint(
        loss, params, alpha=0.2, steps=3, unroll=unroll) for unroll in (1, 3))
    chex.assert_trees_all_close(unrolled, rolled, rtol=1e-12, atol=1e-16)
    fully = hypergrad_output_space.gradient_descent_endpoint(loss, params, alpha=0.2, steps=3, unroll=0)
    chex.assert_trees_all_close(fully, rolled, rtol=1e-12, atol=1e-16)

  def test_zero_means_every_iteration(self):
    assert [hypergrad_output_space.loop_unroll(0, trips) for trips in (0, 1, 40)] == [1, 1, 40]
    assert hypergrad_output_space.loop_unroll(20, 40) == 20


class TestFirstStepNorm:
  """`hypergrad.meta_step_scale='first_step_norm'`: the K = 1 step's size, the estimator's direction."""

  def test_rescales_to_the_given_norm_and_keeps_the_direction(self):
    grad = jnp.asarray([[3.0, -4.0], [0.0, 12.0]])
    scaled = hypergrad.match_first_step_norm(grad, jnp.asarray([[0.0, 0.0], [0.0, 6.5]]))
    np.testing.assert_allclose(scaled, grad / 2, rtol=1e-15)  # ||grad|| = 13, target 6.5.
    np.testing.assert_array_equal(hypergrad.match_first_step_norm(jnp.zeros((2, 2)), grad), 0.0)

  @pytest.mark.parametrize('mode,inner_steps', [
      ('neumann', 3), ('implicit', 1), pytest.param('exact', 2, marks=pytest.mark.slow)])
  def test_meta_step_takes_the_k1_norm_and_its_own_direction(self, mode, inner_steps):
    config = tiny_config(**{'hypergrad.mode': mode, 'hypergrad.inner_steps': inner_steps,
                            'hypergrad.meta_step_scale': 'first_step_norm',
                            'hypergrad.cg_iterations': 4})
    semimeta.validate(config)  # `implicit` needs no meta_lr of its own when rescaled.
    raw_config = config.copy_and_resolve_references()
    raw_config.hypergrad.meta_step_scale = 'none'
    raw_config.hypergrad.meta_lr = 1.0
    k1_config = config.copy_and_resolve_references()
    k1_config.hypergrad.update(mode='exact', inner_steps=1, meta_step_scale='none')
    state = state_lib.init_train_state(config, models.get_model(config, 10), (8, 8, 1),
                                       jax.random.key(0))
    batch = synthetic_batch(jax.random.key(1), batch_size=4, image_shape=(8, 8, 1))
    grads = {}
    for name, cfg in (('scaled', config), ('raw', raw_config), ('k1', k1_config)):
      # Compiled: op by op, the linearised ConvLarge of `neumann` takes ~20 s on a CPU.
      meta = jax.jit(functools.partial(semimeta.meta_pseudo_labels, lr=0.1, key=jax.random.key(2),
                                       config=cfg))
      _, grads[name], _ = meta(state, batch['labeled'], batch['unlabeled'])
    norm = lambda g: float(jnp.linalg.norm(g))
    assert norm(grads['raw']) > 0 and abs(norm(grads['raw']) / norm(grads['k1']) - 1) > 1e-3
    # float32 model: the K = 1 reference here is `exact`, the rescaling's is `jvp`.
    np.testing.assert_allclose(norm(grads['scaled']), norm(grads['k1']), rtol=1e-5)
    cosine = float(jnp.vdot(grads['scaled'], grads['raw'])) / (norm(grads['scaled']) * norm(grads['raw']))
    np.testing.assert_allclose(cosine, 1.0, rtol=1e-6)

  def test_first_step_modes_are_left_alone(self):
    for mode, steps in (('jvp', 1), ('exact', 1), ('neumann', 1)):
      assert hypergrad.is_first_step_hypergradient(mode, steps)
    for mode, steps in (('exact', 2), ('neumann', 4), ('implicit', 1), ('finite_difference', 1)):
      assert not hypergrad.is_first_step_hypergradient(mode, steps)

  @pytest.mark.parametrize('field,value', [('meta_step_scale', 'k1'), ('loop_unroll', -1),
                                           ('loop_unroll', -2)])
  def test_bad_fields_are_config_errors(self, field, value):
    with pytest.raises(errors.ConfigError, match=f'hypergrad.{field}'):
      semimeta.validate(tiny_config(**{f'hypergrad.{field}': value}))
