"""The optax-backed losses against formulas written out in numpy, in float32 as training runs them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semimeta_jax import losses


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  shifted = x - x.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@pytest.mark.slow
def test_optax_cross_entropy_and_kl_with_zero_targets():
  """The optax-backed losses, zeros in the soft targets included (0 log 0 = 0)."""
  logits = jax.random.normal(jax.random.key(0), (32, 10)) * 3
  labels = jax.random.randint(jax.random.key(1), (32,), 0, 10)
  targets = np.asarray(jax.nn.softmax(jax.random.normal(jax.random.key(2), (32, 10)) * 2), np.float64)
  targets[0] = np.eye(10)[3]  # Zeros in the targets: 0 log 0 = 0.
  log_p = _log_softmax(logits)
  np.testing.assert_allclose(losses.cross_entropy_per_example(logits, labels),
                             -log_p[np.arange(32), np.asarray(labels)], rtol=1e-5)
  with np.errstate(divide='ignore', invalid='ignore'):
    t_log_t = np.where(targets > 0, targets * np.log(targets), 0.0)
  kl = np.mean(np.sum(t_log_t - targets * log_p, -1))
  np.testing.assert_allclose(losses.kl_divergence(jnp.asarray(targets, jnp.float32), logits), kl, rtol=1e-5)
  # The gradient in the logits is the soft-target cross-entropy's: softmax - targets, over the batch.
  grad = jax.grad(lambda z: losses.kl_divergence(jnp.asarray(targets, jnp.float32), z))(logits)
  np.testing.assert_allclose(grad, (np.exp(log_p) - targets) / 32, atol=1e-6)
