"""SemiMeta's mix-up: image and target mixed with the same coefficient per example.

The coefficient is read back from the mixed image (labeled images all ones,
unlabeled all zeros, so each mixed pixel *is* lambda_i), and the target must use
that same lambda_i on the labeled side: lam * onehot(y) + (1 - lam) * yhat.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semimeta_jax import methods
from semimeta_jax.methods import semimeta
from tests.conftest import synthetic_batch, tiny_config
from tests.tiny_net import tiny_state

NUM_CLASSES = 5
# Compiled once per (shape, alpha): eager dispatch of each small op is slower.
_mixup = jax.jit(semimeta.mixup, static_argnames=('num_classes', 'concentration'))


def mix(batch_size, alpha, seed=0):
  """Mixes all-ones labeled images with all-zeros unlabeled ones under a fixed key."""
  keys = jax.random.split(jax.random.key(seed), 2)
  labels = jnp.arange(batch_size) % NUM_CLASSES
  labeled = {'image': jnp.ones((batch_size, 4, 3, 2)), 'label': labels}
  pseudo = jax.nn.softmax(jax.random.normal(keys[0], (batch_size, NUM_CLASSES)))
  image, target = _mixup(labeled, jnp.zeros((batch_size, 4, 3, 2)), pseudo, num_classes=NUM_CLASSES,
                         concentration=alpha, key=keys[1])
  return np.asarray(image), np.asarray(target), np.asarray(labels), np.asarray(pseudo)


def test_image_and_target_share_one_coefficient_per_example():
  image, target, labels, pseudo = mix(batch_size=32, alpha=1.0)
  lam = image[:, 0, 0, 0]
  # One coefficient per example, the same over every pixel and channel...
  np.testing.assert_allclose(image, np.broadcast_to(lam[:, None, None, None], image.shape), atol=0)
  assert np.all((lam > 0) & (lam < 1))
  assert np.unique(lam).size == lam.size
  # ...and the target weighs the label by that same lambda.
  onehot = np.eye(NUM_CLASSES)[labels]
  expected = lam[:, None] * onehot + (1.0 - lam[:, None]) * pseudo
  np.testing.assert_allclose(target, expected, atol=1e-6)
  np.testing.assert_allclose(target.sum(-1), 1.0, atol=1e-6)


def test_mixed_image_of_real_images_is_the_convex_combination():
  keys = jax.random.split(jax.random.key(3), 3)
  x_l = jax.random.normal(keys[0], (8, 4, 4, 3))
  x_u = jax.random.normal(keys[1], (8, 4, 4, 3))
  labeled = {'image': x_l, 'label': jnp.zeros(8, jnp.int32)}
  pseudo = jnp.full((8, NUM_CLASSES), 1.0 / NUM_CLASSES)
  image, target = _mixup(labeled, x_u, pseudo, num_classes=NUM_CLASSES, concentration=1.0, key=keys[2])
  # The weight of the label class is lam + (1 - lam) / C, so lam is recoverable from the target.
  lam = (np.asarray(target[:, 0]) - 1.0 / NUM_CLASSES) / (1.0 - 1.0 / NUM_CLASSES)
  expected = lam[:, None, None, None] * np.asarray(x_l) + (1.0 - lam[:, None, None, None]) * np.asarray(x_u)
  np.testing.assert_allclose(image, expected, atol=1e-5)


@pytest.mark.parametrize('alpha', [1.0, 0.1])
def test_coefficients_follow_beta_alpha_alpha(alpha):
  image, _, _, _ = mix(batch_size=4000, alpha=alpha, seed=1)
  lam = image[:, 0, 0, 0]
  # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)); 4000 draws pin both to a few percent.
  assert abs(lam.mean() - 0.5) < 0.03, lam.mean()
  np.testing.assert_allclose(lam.var(), 1.0 / (4.0 * (2.0 * alpha + 1.0)), rtol=0.1)


@pytest.mark.slow
def test_same_key_same_mix_other_key_other_mix():
  first, second, other = mix(16, 1.0, seed=2)[0], mix(16, 1.0, seed=2)[0], mix(16, 1.0, seed=5)[0]
  np.testing.assert_array_equal(first, second)
  assert not np.allclose(first, other)


@pytest.mark.slow
def test_the_step_with_mixup_trains_on_a_mixed_target():
  """With mix-up on, the supervised loss is a KL to soft targets, far below the hard-label CE."""
  config = tiny_config(mixup=True, dropout_rate=0.0, **{'hypergrad.mode': 'jvp'})
  state = tiny_state(config)
  batch = synthetic_batch(jax.random.key(1))
  _, metrics = jax.jit(methods.make_train_step(config, 10))(state, batch)
  labeled = batch['labeled']
  logits, _ = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats}, labeled['image'],
                             train=True, mutable=['batch_stats'])
  log_probs = np.asarray(jax.nn.log_softmax(logits))
  hard_ce = -np.mean(log_probs[np.arange(len(log_probs)), np.asarray(labeled['label'])])
  # The untrained net is nearly uniform (CE ~ log 10); mixed targets put (1 - lam)
  # of their mass on its own near-uniform pseudo-labels, so their KL is far lower.
  supervised = float(metrics['supervised_loss'])
  assert hard_ce > 0.9 * np.log(10.0), hard_ce
  assert 0.0 < supervised < 0.8 * hard_ce, (supervised, hard_ce)
