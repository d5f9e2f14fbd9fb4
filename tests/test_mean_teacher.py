"""Mean Teacher's loss, value by value: CE on the labeled rows plus w(t) times the squared
error between student and teacher over *every* row of the joined batch (labeled ones too)."""

import functools

import jax
import numpy as np

from semimeta_jax import methods
from semimeta_jax.methods import mean_teacher
from tests import numpy_reference
from tests.conftest import synthetic_batch, tiny_config
from tests.tiny_net import TinyNet


def test_the_consistency_covers_every_row_and_the_loss_is_its_weighted_sum_with_the_ce():
  config = tiny_config(method='mean_teacher', ema_decay=0.9, dropout_rate=0.0, input_noise_std=0.0,
                       max_translation=0, perturb_flip=False)
  state = methods.init_train_state(config, TinyNet(), (8, 8, 1), jax.random.key(0))
  # A teacher that predicts differently from the student on every row.
  noise = lambda a, k: a + 0.5 * jax.random.normal(k, a.shape)
  leaves, treedef = jax.tree.flatten(state.params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  teacher = jax.tree.unflatten(treedef, [noise(a, k) for a, k in zip(leaves, keys)])
  batch = synthetic_batch(jax.random.key(2), batch_size=6)
  weight = 4.0
  loss, (_, supervised, consistency, _, _) = jax.jit(functools.partial(
      mean_teacher.objective, weight=weight, config=config))(state.params, teacher, state, batch)

  images = np.concatenate([batch['labeled']['image'], batch['unlabeled']['image']])
  labels = np.asarray(batch['labeled']['label'])
  student = numpy_reference.softmax(numpy_reference.train_mode_logits(state, state.params, images))
  target = numpy_reference.softmax(numpy_reference.train_mode_logits(state, teacher, images))
  squared = (student - target) ** 2
  every_row, unlabeled_rows = squared.mean(), squared[len(labels):].mean()
  assert abs(every_row - unlabeled_rows) > 0.05 * every_row, (every_row, unlabeled_rows)  # Tellable apart.
  expected_supervised = numpy_reference.cross_entropy(
      numpy_reference.train_mode_logits(state, state.params, images)[:len(labels)], labels)
  np.testing.assert_allclose(float(consistency), every_row, rtol=1e-5)
  np.testing.assert_allclose(float(supervised), expected_supervised, rtol=1e-5)
  np.testing.assert_allclose(float(loss), expected_supervised + weight * every_row, rtol=1e-5)
