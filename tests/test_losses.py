"""The losses against NumPy formulas, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semimeta_jax import losses


@pytest.fixture(autouse=True)
def float64():
  with jax.enable_x64(True):
    yield


def numpy_softmax(logits):
  shifted = np.exp(logits - logits.max(-1, keepdims=True))
  return shifted / shifted.sum(-1, keepdims=True)


def problem(seed=0, batch=6, classes=5):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(batch, classes)) * 2.0
  labels = rng.integers(0, classes, batch)
  targets = numpy_softmax(rng.normal(size=(batch, classes)))
  targets[0] = np.eye(classes)[2]  # A one-hot row: 0 * log 0 must count as 0.
  return logits, labels, targets


def test_cross_entropy_is_the_mean_negative_log_likelihood():
  logits, labels, _ = problem()
  nll = -np.log(numpy_softmax(logits)[np.arange(len(labels)), labels])
  np.testing.assert_allclose(losses.cross_entropy_per_example(jnp.asarray(logits), jnp.asarray(labels)), nll,
                             rtol=1e-12)
  np.testing.assert_allclose(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)), nll.mean(),
                             rtol=1e-12)


def test_kl_divergence_value_and_its_soft_cross_entropy_gradient():
  logits, _, targets = problem(1)
  probs = numpy_softmax(logits)
  with np.errstate(divide='ignore', invalid='ignore'):
    pointwise = np.where(targets > 0, targets * np.log(targets / probs), 0.0)
  expected = pointwise.sum(-1).mean()
  np.testing.assert_allclose(losses.kl_divergence(jnp.asarray(targets), jnp.asarray(logits)), expected,
                             rtol=1e-12)
  # d/dlogits of the batch-mean soft cross-entropy: (softmax - target) / B.
  grad = jax.grad(lambda z: losses.kl_divergence(jnp.asarray(targets), z))(jnp.asarray(logits))
  np.testing.assert_allclose(grad, (probs - targets) / len(logits), atol=1e-12)
  assert float(losses.kl_divergence(jnp.asarray(probs), jnp.asarray(logits))) == pytest.approx(0.0, abs=1e-12)


def test_probability_mse_sums_classes_and_averages_examples():
  logits, _, targets = problem(2)
  expected = ((numpy_softmax(logits) - targets) ** 2).sum(-1).mean()
  np.testing.assert_allclose(losses.probability_mse(jnp.asarray(logits), jnp.asarray(targets)), expected,
                             rtol=1e-12)


def test_entropy_in_nats():
  _, _, targets = problem(3)
  with np.errstate(divide='ignore', invalid='ignore'):
    expected = -np.where(targets > 0, targets * np.log(targets), 0.0).sum(-1).mean()
  np.testing.assert_allclose(losses.entropy(jnp.asarray(targets)), expected, rtol=1e-12)
  np.testing.assert_allclose(losses.entropy(jnp.full((2, 4), 0.25)), np.log(4.0), rtol=1e-12)


def test_topk_correct_counts_larger_logits_and_breaks_ties_against_the_label():
  logits = jnp.asarray([[3.0, 2.0, 1.0, 0.0],
                        [3.0, 2.0, 1.0, 0.0],
                        [1.0, 1.0, 1.0, 1.0],
                        [1.0, 1.0, 1.0, 1.0],
                        [0.0, 5.0, 5.0, 1.0]])
  labels = jnp.asarray([0, 2, 0, 1, 2])
  np.testing.assert_array_equal(losses.topk_correct(logits, labels, 1), [1, 0, 1, 0, 0])
  np.testing.assert_array_equal(losses.topk_correct(logits, labels, 2), [1, 0, 1, 1, 1])
  np.testing.assert_array_equal(losses.topk_correct(logits, labels, 3), [1, 1, 1, 1, 1])


def test_half_precision_is_upcast_and_float64_kept():
  assert losses.at_least_float32(jnp.ones(2, jnp.bfloat16)).dtype == jnp.float32
  assert losses.at_least_float32(jnp.ones(2, jnp.float64)).dtype == jnp.float64
