"""Pseudo-Label: the loss against a NumPy reference, and a step that trains."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semimeta_jax import methods
from semimeta_jax import validation
from semimeta_jax.methods import pseudo_label
from tests.conftest import synthetic_batch, tiny_config
from tests.tiny_net import tiny_state


def numpy_pseudo_label_loss(logits, threshold):
  """float64: argmax labels, kept where the max probability reaches the threshold, mean CE over all rows."""
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  probs = np.exp(log_probs)
  labels = probs.argmax(axis=1)
  keep = probs.max(axis=1) >= threshold
  per_example = -log_probs[np.arange(len(labels)), labels]
  return np.sum(np.where(keep, per_example, 0.0)) / len(labels), keep.mean()


def test_the_loss_is_the_thresholded_hard_label_cross_entropy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(12, 10)).astype(np.float32)
  logits[::3, 4] += 9.0  # Every third row is confident about class 4.
  loss, confident = jax.jit(pseudo_label.pseudo_label_loss, static_argnums=1)(logits, 0.95)
  expected_loss, expected_fraction = numpy_pseudo_label_loss(logits, 0.95)
  assert 0 < expected_fraction < 1  # Both kinds of rows are present.
  # The confident rows' CE is ~2e-3: float32 resolves -log p near p = 1 to about 1e-7.
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(confident, expected_fraction)
  # Threshold 0 keeps every row; 1 keeps none.
  np.testing.assert_allclose(pseudo_label.pseudo_label_loss(logits, 0.0)[0],
                             numpy_pseudo_label_loss(logits, 0.0)[0], rtol=1e-5)
  assert float(pseudo_label.pseudo_label_loss(logits, 1.0)[0]) == 0.0


@pytest.mark.slow
def test_the_hard_labels_carry_no_gradient():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(6, 5)) * 4, jnp.float32)
  grad = jax.grad(lambda z: pseudo_label.pseudo_label_loss(z, 0.0)[0])(logits)
  # d/dz of mean CE(z, fixed labels) = (softmax(z) - onehot) / B: no term through the argmax.
  expected = (jax.nn.softmax(logits) - jax.nn.one_hot(jnp.argmax(logits, -1), 5)) / 6
  chex.assert_trees_all_close(grad, expected, rtol=1e-5, atol=1e-7)


def test_the_step_weights_the_loss_and_trains():
  config = tiny_config(method='pseudo_label', dropout_rate=0.0, learning_rate=0.1,
                       consistency_weight=3.0, **{'pseudo_label.threshold': 0.0})
  state = tiny_state(config)
  batch = synthetic_batch(jax.random.key(5))
  step = jax.jit(methods.make_train_step(config, 10))
  new_state, metrics = step(state, batch)
  np.testing.assert_allclose(metrics['loss'], metrics['supervised_loss'] + 3.0 * metrics['consistency_loss'],
                             rtol=1e-5)
  assert float(metrics['confident_fraction']) == 1.0  # Threshold 0: every unlabeled example counts.
  first = float(metrics['supervised_loss'])
  for _ in range(15):
    new_state, metrics = step(new_state, batch)
  assert int(new_state.step) == 16
  assert float(metrics['supervised_loss']) < first  # One fixed batch: the labeled loss falls.


def test_a_bad_threshold_is_named():
  config = tiny_config(method='pseudo_label', **{'pseudo_label.threshold': 1.5})
  with pytest.raises(validation.ConfigError, match='config.pseudo_label.threshold=1.5'):
    validation.validate_config(config)


def lee_alpha(step, alpha_f, t1, t2):
  """Lee (2013), equation 16, written out."""
  if step < t1:
    return 0.0
  if step < t2:
    return alpha_f * (step - t1) / (t2 - t1)
  return alpha_f


def test_alpha_is_lees_delayed_ramp_read_at_the_step_being_taken():
  # T1 = 2, T2 = 6, alpha_f = 3: the weight of step t's loss is alpha(t), not alpha(t + 1).
  config = tiny_config(method='pseudo_label', consistency_weight=3.0, consistency_rampup_steps=6,
                       **{'pseudo_label.rampup_start_steps': 2})
  state = tiny_state(config)
  batch = synthetic_batch(jax.random.key(6))
  step = jax.jit(methods.make_train_step(config, 10))
  for t in range(8):
    assert int(state.step) == t
    state, metrics = step(state, batch)
    want = lee_alpha(t, 3.0, 2, 6)
    np.testing.assert_allclose(float(metrics['consistency_weight']), want, rtol=1e-6, atol=0)
    np.testing.assert_allclose(float(metrics['loss']),
                               float(metrics['supervised_loss']) + want * float(metrics['consistency_loss']),
                               rtol=1e-5)
  assert float(metrics['consistency_loss']) > 0  # The unlabeled term is there to be weighted.
  # T1 = T2: a step from 0 to alpha_f at T1.
  jump = pseudo_label.alpha_schedule(tiny_config(method='pseudo_label', consistency_weight=3.0,
                                                 consistency_rampup_steps=4,
                                                 **{'pseudo_label.rampup_start_steps': 4}))
  assert [float(jump(t)) for t in (3, 4, 5)] == [0.0, 3.0, 3.0]


@pytest.mark.parametrize('dataset', ['digits', 'cifar10'])
def test_the_presets_are_lees(dataset):
  fields = methods.presets(dataset)['pseudo_label']
  config = tiny_config(**fields)
  validation.validate_config(config)
  assert config.pseudo_label.threshold == 0.0 and config.consistency_weight == 3.0  # No threshold, alpha_f 3.
  t1, t2 = config.pseudo_label.rampup_start_steps, config.consistency_rampup_steps
  assert 0 < t1 < t2
  alpha = pseudo_label.alpha_schedule(config)
  assert float(alpha(t1 - 1)) == 0.0 and float(alpha(t1)) == 0.0
  np.testing.assert_allclose(float(alpha((t1 + t2) // 2)), 1.5, rtol=1e-3)
  assert float(alpha(t2)) == 3.0


def test_a_ramp_start_after_its_end_is_named():
  config = tiny_config(method='pseudo_label', consistency_rampup_steps=5, **{'pseudo_label.rampup_start_steps': 6})
  with pytest.raises(validation.ConfigError, match='config.pseudo_label.rampup_start_steps=6'):
    validation.validate_config(config)
