"""The heart of SemiMeta: the real update trains on the *updated* pseudo-labels yhat.

The step is checked against a loss assembled here by hand, from a hypergradient
written out here (not the project's estimators), so that a step that trains on the
initial prediction ytil, drops the relu of the projection, the consistency weight
or the second forward's running averages, or gets the default step sizes wrong, fails.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semimeta_jax.methods import hypergrad
from semimeta_jax import methods
from tests.conftest import synthetic_batch, tiny_config
from tests.tiny_net import tiny_state

# beta large enough that the pseudo-label step drives ~45% of the entries below
# zero (ytil ~ 0.1 per class, |g| ~ 1e-3 at alpha = 0.5 on this net), so the relu
# matters; no stepped entry lies within 5e-3 of the kink.
META_LR = 500.0
WEIGHT = 2.0  # Not 1, so that a dropped consistency weight shows.
LR = 0.5  # A power of two: (old - new) / LR recovers the gradient without rounding.


def core_config(**overrides):
  # Plain SGD (no momentum, no weight decay): the parameter change of one step is
  # -LR times the loss gradient. No dropout, so no keys enter the math.
  fields = {'mixup': False, 'dropout_rate': 0.0, 'momentum': 0.0, 'weight_decay': 0.0,
            'learning_rate': LR, 'consistency_weight': WEIGHT, 'hypergrad.meta_lr': META_LR,
            'hypergrad.mode': 'jvp'}
  fields.update(overrides)
  return tiny_config(**fields)


def independent_hypergradient(logits_fn, params, x_l, y_l, x_u, ytil, alpha):
  """d L_l(theta - alpha grad L_u(theta, y)) / d y at ytil, written out without hypergrad.py."""

  def bilevel(y):
    unlabeled = lambda p: jnp.mean(jnp.sum((jax.nn.softmax(logits_fn(p, x_u)) - y) ** 2, -1))
    adapted = jax.tree.map(lambda p, g: p - alpha * g, params, jax.grad(unlabeled)(params))
    log_probs = jax.nn.log_softmax(logits_fn(adapted, x_l))
    return -jnp.mean(jnp.take_along_axis(log_probs, y_l[:, None], -1))

  return jax.grad(bilevel)(ytil)


def numpy_relu_normalize(stepped):
  """The official projection: relu, then each row divided by its sum."""
  positive = np.maximum(np.asarray(stepped, np.float64), 0.0)
  return positive / positive.sum(-1, keepdims=True)


class Problem:
  """A tiny network with batch norm, one batch, and the forwards written out."""

  def __init__(self):
    self.state = tiny_state(core_config())
    self.batch = synthetic_batch(jax.random.key(1))
    self.x_l, self.y_l = self.batch['labeled']['image'], self.batch['labeled']['label']
    self.x_u = self.batch['unlabeled']['image']

  def eval_logits(self, params, x):
    return self.state.apply_fn({'params': params, 'batch_stats': self.state.batch_stats}, x, train=False)

  def train_logits(self, params, x, running=None):
    running = self.state.batch_stats if running is None else running
    return self.state.apply_fn({'params': params, 'batch_stats': running}, x, train=True,
                               mutable=['batch_stats'])

  def step(self, **overrides):
    """One real step of `make_train_step`: (new state, metrics, minus the gradient it took)."""
    new_state, metrics = jax.jit(methods.make_train_step(core_config(**overrides), 10))(self.state, self.batch)
    step_grads = jax.tree.map(lambda old, new: (old - new) / LR, self.state.params, new_state.params)
    return new_state, metrics, step_grads

  def pseudo_labels(self, meta_logits, beta):
    """(ytil, g, yhat) with g from `independent_hypergradient` at alpha = LR."""
    ytil = jax.nn.softmax(self.eval_logits(self.state.params, self.x_u))
    grad = independent_hypergradient(meta_logits, self.state.params, self.x_l, self.y_l, self.x_u, ytil,
                                     alpha=LR)
    return ytil, grad, hypergrad.update_pseudo_labels(ytil, grad, beta=beta)


@pytest.fixture(scope='module')
def problem():
  return Problem()


@pytest.fixture(scope='module')
def reference(problem):
  """One real step (explicit beta) and the pieces of the loss it should have minimised."""
  p = problem

  @jax.jit
  def pieces(params):
    ytil, grad, yhat = p.pseudo_labels(p.eval_logits, META_LR)

    def loss(q, target):  # CE on the labeled batch + w ||softmax(f(x_u)) - target||^2.
      logits, _ = p.train_logits(q, p.x_l)
      supervised = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), p.y_l[:, None], -1))
      unlabeled_logits, _ = p.train_logits(q, p.x_u)
      consistency = jnp.mean(jnp.sum((jax.nn.softmax(unlabeled_logits) - target) ** 2, -1))
      return supervised + WEIGHT * consistency, consistency

    # The running averages after the labeled forward, then the unlabeled one.
    _, after_labeled = p.train_logits(params, p.x_l)
    _, after_both = p.train_logits(params, p.x_u, after_labeled['batch_stats'])
    return {
        'ytil': ytil, 'grad': grad, 'yhat': yhat,
        'grads_yhat': jax.grad(lambda q: loss(q, yhat)[0])(params),
        'grads_ytil': jax.grad(lambda q: loss(q, ytil)[0])(params),
        'consistency_yhat': loss(params, yhat)[1],
        'consistency_ytil': loss(params, ytil)[1],
        'batch_stats': after_both['batch_stats'],
    }

  expected = pieces(p.state.params)
  new_state, metrics, step_grads = p.step()
  return expected, step_grads, new_state, metrics


def pseudo_label_change(ytil, yhat):
  """The step's 'pseudo_label_change' metric: mean L1 distance between the label sets."""
  return np.mean(np.abs(np.asarray(yhat, np.float64) - np.asarray(ytil, np.float64)).sum(-1))


def tree_relative_error(a, b):
  diff = jax.tree.map(lambda x, y: jnp.sum((x - y) ** 2), a, b)
  norm = jax.tree.map(lambda y: jnp.sum(y ** 2), b)
  return float(jnp.sqrt(sum(jax.tree.leaves(diff)) / sum(jax.tree.leaves(norm))))


def test_the_pseudo_label_step_drives_entries_negative_and_the_relu_projects_them(reference):
  expected, *_ = reference
  stepped = np.asarray(expected['ytil'] - META_LR * expected['grad'])
  # Preconditions: entries go negative, yet every row keeps some mass (no fallback).
  assert (stepped < 0).mean() > 0.2
  assert np.all(np.maximum(stepped, 0).sum(-1) > 0.1)
  np.testing.assert_allclose(expected['yhat'], numpy_relu_normalize(stepped), atol=1e-6)
  assert np.abs(np.asarray(expected['yhat']) - np.asarray(expected['ytil'])).max() > 0.05


def test_the_step_trains_on_yhat_not_ytil(reference):
  expected, step_grads, _, _ = reference
  # The two candidate targets give clearly different gradients...
  assert tree_relative_error(expected['grads_ytil'], expected['grads_yhat']) > 0.05
  # ...and the step took the one of yhat (float32 rounding is ~1e-6 here).
  assert tree_relative_error(step_grads, expected['grads_yhat']) < 1e-3


def test_the_reported_losses_are_those_of_yhat(reference):
  expected, _, _, metrics = reference
  consistency = float(metrics['consistency_loss'])
  np.testing.assert_allclose(consistency, expected['consistency_yhat'], rtol=1e-4)
  assert abs(float(expected['consistency_ytil']) - consistency) > 1e-2
  np.testing.assert_allclose(metrics['loss'], metrics['supervised_loss'] + WEIGHT * consistency, rtol=1e-5)
  np.testing.assert_allclose(metrics['consistency_weight'], WEIGHT)
  np.testing.assert_allclose(metrics['learning_rate'], LR)
  np.testing.assert_allclose(metrics['pseudo_label_change'],
                             pseudo_label_change(expected['ytil'], expected['yhat']), rtol=1e-3)


def test_the_running_averages_follow_both_forwards(reference):
  expected, _, new_state, _ = reference
  chex.assert_trees_all_close(new_state.batch_stats, expected['batch_stats'], rtol=1e-5, atol=1e-6)
  assert int(new_state.step) == 1


def test_the_default_meta_lr_is_the_official_batch_size_times_lr_over_alpha(problem):
  # meta_lr = 0: beta = lr * B_u / alpha, i.e. B_u = 16 at the default alpha = lr.
  _, metrics, _ = problem.step(**{'hypergrad.meta_lr': 0.0})
  ytil, _, yhat = jax.jit(lambda: problem.pseudo_labels(problem.eval_logits, 16.0))()
  expected = pseudo_label_change(ytil, yhat)
  assert expected > 1e-3  # The update is not a no-op.
  np.testing.assert_allclose(metrics['pseudo_label_change'], expected, rtol=1e-3)


def test_a_training_mode_meta_forward_gives_the_exact_hypergradient(problem):
  """forward_mode='train': batch statistics in the meta forward, so theta~ != theta."""
  _, metrics, _ = problem.step(**{'hypergrad.forward_mode': 'train'})
  meta_logits = lambda params, x: problem.train_logits(params, x)[0]
  ytil, grad, yhat = jax.jit(lambda: problem.pseudo_labels(meta_logits, META_LR))()
  np.testing.assert_allclose(metrics['hypergradient_norm'], np.linalg.norm(grad), rtol=1e-3)
  np.testing.assert_allclose(metrics['pseudo_label_change'], pseudo_label_change(ytil, yhat), rtol=1e-3)


def test_with_the_strong_view_yhat_of_the_weak_view_supervises_the_strong_views_prediction(problem):
  """`semimeta.strong_view`: steps 1-3 on the weak view; the consistency forward on the strong one."""
  p = problem
  strong = p.x_u[::-1] * 0.5 + 0.3  # Another image per row: the view must be the one trained on.
  batch = {'labeled': p.batch['labeled'], 'unlabeled': {**p.batch['unlabeled'], 'strong_image': strong}}
  config = core_config(**{'semimeta.strong_view': True})
  assert methods.configure(config).strong_view
  new_state, metrics = jax.jit(methods.make_train_step(config, 10))(p.state, batch)
  step_grads = jax.tree.map(lambda old, new: (old - new) / LR, p.state.params, new_state.params)

  @jax.jit
  def expected(params):
    _, _, yhat = p.pseudo_labels(p.eval_logits, META_LR)  # From the weak view, as without it.

    def loss(q):
      logits, _ = p.train_logits(q, p.x_l)
      supervised = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), p.y_l[:, None], -1))
      strong_logits, _ = p.train_logits(q, strong)
      consistency = jnp.mean(jnp.sum((jax.nn.softmax(strong_logits) - yhat) ** 2, -1))
      return supervised + WEIGHT * consistency, consistency

    return jax.grad(lambda q: loss(q)[0])(params), loss(params)[1]

  grads, consistency = expected(p.state.params)
  assert tree_relative_error(step_grads, grads) < 1e-3
  np.testing.assert_allclose(metrics['consistency_loss'], consistency, rtol=1e-4)
  _, weak_metrics, _ = p.step()  # The weak view's consistency differs: the test can tell them apart.
  assert abs(float(weak_metrics['consistency_loss']) - float(consistency)) > 1e-3
