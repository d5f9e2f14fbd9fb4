"""Meta Pseudo Labels' teacher feedback on two tiny MLPs in float64, against independent references."""

import functools
import itertools

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

from semimeta_jax.methods import hypergrad
from semimeta_jax.methods import mpl_feedback

NUM_CLASSES = 4
TEMPERATURE = 0.7
ALPHA = 0.3


@pytest.fixture(autouse=True)
def float64():
  with jax.enable_x64(True):
    yield


def mlp(params, x):
  """Dense -> tanh -> Dense: the teacher's and the student's architecture (of different widths)."""
  return jnp.tanh(x @ params['w1'] + params['b1']) @ params['w2'] + params['b2']


def mlp_params(key, hidden):
  keys = jax.random.split(key, 4)
  return {'w1': jax.random.normal(keys[0], (6, hidden)) * 0.8, 'b1': jax.random.normal(keys[1], (hidden,)) * 0.3,
          'w2': jax.random.normal(keys[2], (hidden, NUM_CLASSES)) * 0.8,
          'b2': jax.random.normal(keys[3], (NUM_CLASSES,)) * 0.3}


def problem(num_labeled=5, num_unlabeled=7, seed=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  phi, theta = mlp_params(keys[0], 5), mlp_params(keys[1], 8)
  x_l = jax.random.normal(keys[2], (num_labeled, 6))
  y_l = jax.random.randint(keys[3], (num_labeled,), 0, NUM_CLASSES)
  x_u = jax.random.normal(keys[4], (num_unlabeled, 6))
  return phi, theta, x_l, y_l, x_u


def flat(tree):
  return np.concatenate([np.ravel(np.asarray(leaf)) for leaf in jax.tree.leaves(tree)])


def labeled_loss(params, x_l, y_l):
  """L_l written without the project's code."""
  log_probs = jax.nn.log_softmax(mlp(params, x_l))
  return -jnp.mean(log_probs[jnp.arange(x_l.shape[0]), y_l])


def reference_objective(phi, theta, x_l, y_l, x_u, *, alpha, inner_steps):
  """phi -> L_l(theta_K) with theta_{k+1} = theta_k - alpha grad CE(softmax(T_phi(x_u) / tau), S(x_u))."""
  targets = jax.nn.softmax(mlp(phi, x_u) / TEMPERATURE)

  def unlabeled_loss(params):
    return -jnp.sum(targets * jax.nn.log_softmax(mlp(params, x_u))) / x_u.shape[0]

  for _ in range(inner_steps):
    grads = jax.grad(unlabeled_loss)(theta)
    theta = {k: theta[k] - alpha * grads[k] for k in theta}
  return labeled_loss(theta, x_l, y_l)


def exact_meta_gradient(mode, phi, theta, x_l, y_l, x_u, *, alpha=ALPHA, inner_steps=1):
  """The teacher's meta-gradient as the training step builds it: labels, g_y, surrogate, VJP."""
  return flat(_exact_meta_gradient(mode, phi, theta, x_l, y_l, x_u, alpha, inner_steps))


@functools.partial(jax.jit, static_argnums=(0, 7))
def _exact_meta_gradient(mode, phi, theta, x_l, y_l, x_u, alpha, inner_steps):
  logits, pull_back = jax.vjp(lambda p: mlp(p, x_u), phi)
  labels = mpl_feedback.soft_labels(logits, TEMPERATURE)
  grad_labels = mpl_feedback.label_gradient(mode, mlp, theta, x_l, y_l, x_u, labels, alpha=alpha,
                                            inner_steps=inner_steps)
  logit_grads = jax.grad(mpl_feedback.exact_surrogate)(logits, grad_labels, TEMPERATURE)
  return pull_back(logit_grads)[0]


def central_differences(fn, params, step=1e-5):
  """d fn / d params, one coordinate at a time."""
  flat_params, unravel = ravel_pytree(params)
  of_vectors = jax.jit(jax.vmap(lambda v: fn(unravel(v))))
  shifts = step * jnp.eye(flat_params.shape[0])
  return np.asarray(of_vectors(flat_params + shifts) - of_vectors(flat_params - shifts)) / (2 * step)


def relative_error(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def cosine(a, b):
  return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize('inner_steps', [1, pytest.param(2, marks=pytest.mark.slow)])
def test_exact_teacher_meta_gradient_equals_central_differences(inner_steps):
  phi, theta, x_l, y_l, x_u = problem()
  got = exact_meta_gradient('exact', phi, theta, x_l, y_l, x_u, inner_steps=inner_steps)
  expected = central_differences(
      lambda p: reference_objective(p, theta, x_l, y_l, x_u, alpha=ALPHA, inner_steps=inner_steps), phi)
  assert relative_error(got, expected) < 1e-7
  assert np.linalg.norm(expected) > 1e-3  # A gradient, not two zeros.


def test_jvp_and_first_step_modes_equal_exact_where_the_engine_says_so():
  phi, theta, x_l, y_l, x_u = problem()
  exact = exact_meta_gradient('exact', phi, theta, x_l, y_l, x_u)
  for mode in mpl_feedback.LABEL_GRADIENT_MODES:
    got = exact_meta_gradient(mode, phi, theta, x_l, y_l, x_u)
    error = relative_error(got, exact)
    if hypergrad.is_first_step_hypergradient(mode, 1):
      assert error < 1e-12, mode
    elif mode == 'finite_difference':
      assert error < 1e-3, mode  # eps = 1e-2 of ||v||: a second-order error.
    else:  # first_order takes grad L_l at theta, not theta~: not the K = 1 meta-gradient here.
      assert error > 1e-3, mode


def test_neumann_and_implicit_refuse_the_cross_entropy_inner_loss():
  phi, theta, x_l, y_l, x_u = problem()
  labels = mpl_feedback.soft_labels(mlp(phi, x_u), TEMPERATURE)
  for mode in ('neumann', 'implicit'):
    with pytest.raises(ValueError, match='squared-error inner loss only'):
      hypergrad.hypergradient(mode, mlp, theta, x_l, y_l, x_u, labels, alpha=ALPHA,
                              inner_loss_kind='cross_entropy')


def hard_label_step(theta, x_u, hard, lr):
  """(theta', grad_theta CE(y^, S(x_u; theta))) of one plain SGD step on the sampled labels."""
  loss = lambda p: -jnp.mean(jax.nn.log_softmax(mlp(p, x_u))[jnp.arange(x_u.shape[0]), hard])
  grads = jax.grad(loss)(theta)
  return {k: theta[k] - lr * grads[k] for k in theta}, grads


def test_paper_h_is_the_dot_product_and_the_taylor_estimate_of_old_minus_new():
  phi, theta, x_l, y_l, x_u = problem()
  hard = mpl_feedback.sampled_labels(jax.random.key(3), mlp(phi, x_u), TEMPERATURE)
  misses = []
  for lr in (0.02, 0.01):
    new_theta, unlabeled_grads = hard_label_step(theta, x_u, hard, lr)
    new_grads = jax.grad(labeled_loss)(new_theta, x_l, y_l)
    h = float(mpl_feedback.paper_coefficient(new_grads, unlabeled_grads, lr))
    np.testing.assert_allclose(h, lr * np.dot(flat(new_grads), flat(unlabeled_grads)), rtol=1e-12)
    old_minus_new = float(labeled_loss(theta, x_l, y_l) - labeled_loss(new_theta, x_l, y_l))
    misses.append(abs(old_minus_new - h))
  # old - new = h + O(lr^2): halving lr quarters the miss (the opposite sign would only halve it).
  assert 3.0 < misses[0] / misses[1] < 5.0


def expected_paper_feedback(phi, theta, x_l, y_l, x_u, lr, h_sign=1.0):
  """E over every joint draw of hard labels of h grad_phi CE(y^, T_phi(x_u)), enumerated exactly."""
  logits, pull_back = jax.vjp(lambda p: mlp(p, x_u), phi)
  draws = jnp.asarray(list(itertools.product(range(NUM_CLASSES), repeat=x_u.shape[0])))

  def feedback(hard):
    new_theta, unlabeled_grads = hard_label_step(theta, x_u, hard, lr)
    h = h_sign * mpl_feedback.paper_coefficient(jax.grad(labeled_loss)(new_theta, x_l, y_l),
                                                unlabeled_grads, lr)
    logit_grads = jax.grad(mpl_feedback.paper_surrogate)(logits, hard, h, TEMPERATURE)
    return ravel_pytree(pull_back(logit_grads)[0])[0]

  log_probs = jax.nn.log_softmax(logits / TEMPERATURE)
  probabilities = jnp.exp(jnp.sum(log_probs[jnp.arange(x_u.shape[0]), draws], axis=-1))
  np.testing.assert_allclose(float(jnp.sum(probabilities)), 1.0, rtol=1e-12)  # Every draw, once.
  return np.asarray(probabilities @ jax.jit(jax.vmap(feedback))(draws))


@pytest.mark.slow
def test_the_expected_paper_feedback_against_the_exact_soft_gradient():
  """Stated: on this problem (B_u = 3, 4 classes, lr 0.3) the cosine is 0.998 (0.99992 at lr 0.03).

  The expectation is over all 4^3 joint label draws, exactly. As lr -> 0 it tends to 1 / B_u
  times the exact meta-gradient of the soft labels (its first-order term): the miss falls in
  proportion to lr, and the sign -1 reverses it. Printed with -s.
  """
  phi, theta, x_l, y_l, x_u = problem(num_unlabeled=3)
  misses = {}
  for lr in (0.3, 0.03, 0.003):
    exact = exact_meta_gradient('exact', phi, theta, x_l, y_l, x_u, alpha=lr)
    expected = expected_paper_feedback(phi, theta, x_l, y_l, x_u, lr)
    print(f'lr {lr}: cosine {cosine(expected, exact):.5f}, '
          f'|B_u E| / |exact| {np.linalg.norm(3 * expected) / np.linalg.norm(exact):.4f}')
    misses[lr] = relative_error(3 * expected, exact)
    if lr == 0.3:
      assert cosine(expected, exact) > 0
      flipped = expected_paper_feedback(phi, theta, x_l, y_l, x_u, lr, h_sign=-1.0)
      np.testing.assert_allclose(flipped, -expected, rtol=1e-12)
  assert misses[0.03] / misses[0.003] > 5.0  # O(lr): ten times smaller lr, about ten times smaller miss.


def test_released_code_term_has_zero_gradient_and_a_nonzero_coefficient():
  _, _, _, _, x_u = problem()
  logits = 3.0 * jax.random.normal(jax.random.key(4), (7, NUM_CLASSES))
  h, baseline = mpl_feedback.released_code_coefficient(2.0, 1.5, 0.1, baseline_decay=0.99)
  # b <- 0.1 - 0.01 (0.1 - 0.5) = 0.104; h = 0.5 - 0.104.
  np.testing.assert_allclose(float(baseline), 0.104, rtol=1e-12)
  np.testing.assert_allclose(float(h), 0.396, rtol=1e-12)
  value, grads = jax.value_and_grad(mpl_feedback.released_code_surrogate)(logits, h)
  assert abs(float(value)) > 0.01  # The term is there: h times the teacher's own entropy.
  np.testing.assert_allclose(np.asarray(grads), 0.0, atol=1e-15)
  del x_u
