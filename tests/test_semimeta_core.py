"""The heart of SemiMeta: the real update trains on the *updated* pseudo-labels yhat.

The step is checked against a loss assembled here by hand, from a hypergradient
written out here (not the project's estimators), so that a step that trains on the
initial prediction ytil, drops the relu of the projection, the consistency weight
or a term, or takes its gradient through the targets, fails.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semimeta_jax import hypergrad
from semimeta_jax import methods
from semimeta_jax import models
from semimeta_jax import state as state_lib
from tests.conftest import synthetic_batch, tiny_config

# beta large enough that the pseudo-label step drives ~40% of the entries below
# zero (ytil ~ 0.1 per class, |g| ~ 2e-3 on this network), so the relu matters.
META_LR = 100.0
WEIGHT = 2.0  # Not 1, so that a dropped consistency weight shows.


def core_config(**overrides):
  # Plain SGD at lr 1 (no momentum, no weight decay): the parameter change of
  # one step is minus the loss gradient. No dropout, so no keys enter the math.
  fields = {'mixup': False, 'dropout_rate': 0.0, 'momentum': 0.0, 'weight_decay': 0.0,
            'learning_rate': 1.0, 'consistency_weight': WEIGHT, 'hypergrad.meta_lr': META_LR}
  fields.update(overrides)
  return tiny_config(**fields)


def independent_hypergradient(eval_logits, params, x_l, y_l, x_u, ytil, alpha):
  """d L_l(theta - alpha grad L_u(theta, y)) / d y at ytil, written out without hypergrad.py."""

  def bilevel(y):
    unlabeled = lambda p: jnp.mean(jnp.sum((jax.nn.softmax(eval_logits(p, x_u)) - y) ** 2, -1))
    adapted = jax.tree.map(lambda p, g: p - alpha * g, params, jax.grad(unlabeled)(params))
    log_probs = jax.nn.log_softmax(eval_logits(adapted, x_l))
    return -jnp.mean(jnp.take_along_axis(log_probs, y_l[:, None], -1))

  return jax.grad(bilevel)(ytil)


def numpy_relu_normalize(stepped):
  """The official projection: relu, then each row divided by its sum."""
  positive = np.maximum(np.asarray(stepped, np.float64), 0.0)
  return positive / positive.sum(-1, keepdims=True)


@pytest.fixture(scope='module')
def reference():
  """One real step and the pieces of the loss it should have minimised."""
  config = core_config(**{'hypergrad.mode': 'jvp'})
  model = models.get_model(config, 10)
  state = state_lib.init_train_state(config, model, (8, 8, 1), jax.random.key(0))
  batch = synthetic_batch(jax.random.key(1))
  x_l, y_l = batch['labeled']['image'], batch['labeled']['label']
  x_u = batch['unlabeled']['image']
  stats = state.batch_stats

  def eval_logits(params, x):
    return model.apply({'params': params, 'batch_stats': stats}, x, train=False)

  def train_logits(params, x, running):
    return model.apply({'params': params, 'batch_stats': running}, x, train=True, mutable=['batch_stats'])

  @jax.jit
  def pieces(params):
    ytil = jax.nn.softmax(eval_logits(params, x_u))
    grad = independent_hypergradient(eval_logits, params, x_l, y_l, x_u, ytil, alpha=1.0)
    yhat = hypergrad.update_pseudo_labels(ytil, grad, beta=META_LR)

    def loss(p, target):  # CE on the labeled batch + w ||softmax(f(x_u)) - target||^2.
      logits, _ = train_logits(p, x_l, stats)
      supervised = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y_l[:, None], -1))
      unlabeled_logits, _ = train_logits(p, x_u, stats)
      consistency = jnp.mean(jnp.sum((jax.nn.softmax(unlabeled_logits) - target) ** 2, -1))
      return supervised + WEIGHT * consistency, consistency

    # The running averages after the labeled forward, then the unlabeled one.
    _, after_labeled = train_logits(params, x_l, stats)
    _, after_both = train_logits(params, x_u, after_labeled['batch_stats'])
    return {
        'ytil': ytil, 'grad': grad, 'yhat': yhat,
        'grads_yhat': jax.grad(lambda p: loss(p, yhat)[0])(params),
        'grads_ytil': jax.grad(lambda p: loss(p, ytil)[0])(params),
        'consistency_yhat': loss(params, yhat)[1],
        'consistency_ytil': loss(params, ytil)[1],
        'batch_stats': after_both['batch_stats'],
    }

  expected = pieces(state.params)
  new_state, metrics = jax.jit(methods.make_train_step(config, 10))(state, batch)
  step_grads = jax.tree.map(lambda old, new: old - new, state.params, new_state.params)
  return expected, step_grads, new_state, metrics


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
  np.testing.assert_allclose(metrics['learning_rate'], 1.0)
  change = np.mean(np.abs(np.asarray(expected['yhat']) - np.asarray(expected['ytil'])).sum(-1))
  np.testing.assert_allclose(metrics['pseudo_label_change'], change, rtol=1e-3)


def test_the_running_averages_follow_both_forwards(reference):
  expected, _, new_state, _ = reference
  chex.assert_trees_all_close(new_state.batch_stats, expected['batch_stats'], rtol=1e-5, atol=1e-6)
  assert int(new_state.step) == 1
