"""The consistency baselines' supervised term is the CE of the *labeled* part of the joined batch.

On a fixed batch a net can fit any labels, so a CE on the wrong rows still trains
(test_baselines.py cannot tell); here, with the perturbations and dropout off,
each view is a plain training-mode forward of [labeled; unlabeled], and the step's
reported losses are checked against that forward's CE on the first rows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semimeta_jax import methods
from tests.conftest import synthetic_batch, tiny_config
from tests.tiny_net import tiny_state

NO_NOISE = {'input_noise_std': 0.0, 'max_translation': 0, 'perturb_flip': False, 'dropout_rate': 0.0,
            'consistency_rampup_steps': 0, 'consistency_weight': 3.0}


@pytest.mark.parametrize('method, extra', [('pi_model', {}), ('mean_teacher', {'ema_decay': 0.9})])
def test_supervised_loss_is_the_ce_of_the_labeled_rows(method, extra):
  config = tiny_config(method=method, **NO_NOISE, **extra)
  state = tiny_state(config)
  if method == 'mean_teacher':  # tiny_state keeps no EMA unless asked; the teacher starts as a copy.
    state = state.replace(extra={'ema': {'params': state.params, 'batch_stats': state.batch_stats}})
  batch = synthetic_batch(jax.random.key(2))
  _, metrics = jax.jit(methods.make_train_step(config, 10))(state, batch)

  labeled = batch['labeled']
  joined = jnp.concatenate([labeled['image'], batch['unlabeled']['image']])
  logits, _ = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats}, joined, train=True,
                             mutable=['batch_stats'])
  num_labeled = labeled['image'].shape[0]
  log_probs = jax.nn.log_softmax(logits[:num_labeled])
  expected = -np.mean(np.take_along_axis(np.asarray(log_probs), np.asarray(labeled['label'])[:, None], -1))
  np.testing.assert_allclose(metrics['supervised_loss'], expected, rtol=1e-5)
  # Identical views (and, for Mean Teacher, a teacher equal to the student): no consistency.
  np.testing.assert_allclose(metrics['consistency_loss'], 0.0, atol=1e-10)
  np.testing.assert_allclose(metrics['loss'], expected, rtol=1e-5)
  accuracy = np.mean(np.argmax(logits[:num_labeled], -1) == np.asarray(labeled['label']))
  np.testing.assert_allclose(metrics['train_accuracy'], accuracy)
