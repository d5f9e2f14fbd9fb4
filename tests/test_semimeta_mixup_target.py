"""SemiMeta's supervised term under mix-up: its target mixes the label with the *updated*
pseudo-label yhat (after the meta step), never the initial prediction ytil.

The reference rebuilds the mixed images and targets in numpy from the step's own
keys and from yhat, and takes the KL of the network's training-mode prediction.
"""

import pytest
import jax
import numpy as np

from semimeta_jax import methods
from semimeta_jax import schedules
from semimeta_jax.methods import common
from semimeta_jax.methods import semimeta
from tests import numpy_reference
from tests.conftest import synthetic_batch, tiny_config
from tests.tiny_net import tiny_state

NUM_CLASSES, ALPHA = 10, 0.75


def _supervised_reference(state, batch, pseudo_labels):
  """KL(lam onehot(y) + (1 - lam) pseudo || softmax(f(lam x_l + (1 - lam) x_u))), in numpy."""
  lam = np.asarray(jax.random.beta(state.step_key(common.MIXUP), ALPHA, ALPHA,
                                   (batch['labeled']['image'].shape[0],)), np.float64)
  x_l = np.asarray(batch['labeled']['image'], np.float64)
  x_u = np.asarray(batch['unlabeled']['image'], np.float64)
  image = lam[:, None, None, None] * x_l + (1 - lam[:, None, None, None]) * x_u
  onehot = np.eye(NUM_CLASSES)[np.asarray(batch['labeled']['label'])]
  target = lam[:, None] * onehot + (1 - lam[:, None]) * np.asarray(pseudo_labels, np.float64)
  logits = numpy_reference.train_mode_logits(state, state.params, image.astype(np.float32))
  return numpy_reference.kl(target, numpy_reference.softmax(logits))


@pytest.mark.slow
def test_the_mixed_target_is_built_from_the_meta_updated_pseudo_labels():
  config = tiny_config(mixup=True, mixup_alpha=ALPHA, dropout_rate=0.0,
                       **{'hypergrad.mode': 'jvp', 'hypergrad.meta_lr': 200.0})
  state = tiny_state(config, num_classes=NUM_CLASSES)
  batch = synthetic_batch(jax.random.key(4), num_classes=NUM_CLASSES)
  _, metrics = jax.jit(methods.make_train_step(config, NUM_CLASSES))(state, batch)
  lr = schedules.learning_rate_schedule(config)(state.step)
  ytil, _, yhat = jax.jit(lambda s: semimeta.meta_pseudo_labels(
      s, batch['labeled'], batch['unlabeled'], lr=lr, key=s.step_key(common.DROPOUT_META),
      config=config))(state)
  with_yhat = _supervised_reference(state, batch, yhat)
  with_ytil = _supervised_reference(state, batch, ytil)
  assert abs(with_yhat - with_ytil) > 0.05 * with_yhat, (with_yhat, with_ytil)  # Tellable apart.
  np.testing.assert_allclose(float(metrics['supervised_loss']), with_yhat, rtol=1e-4)
