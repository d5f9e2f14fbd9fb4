"""Pseudo-Label (Lee, "Pseudo-Label: The Simple and Efficient Semi-Supervised Learning Method
for Deep Neural Networks", ICML 2013 Workshop on Challenges in Representation Learning).

Each unlabeled example takes as its label the class the network predicts for it now
(the argmax, recomputed at every update), and is trained on with the cross-entropy
to that hard label, weighted by alpha(t), ramped up from 0. Only the confident ones
count: an example whose largest predicted probability is below
`pseudo_label.threshold` (0.95) adds nothing, the usual reading of the method since
(e.g. Oliver et al., 2018). One training step:
  1. one training-mode forward of the joined labeled + unlabeled batch;
  2. y' = argmax softmax(f(x_u)), mask = max softmax(f(x_u)) >= threshold, both
     without gradient;
  3. loss = CE(labeled) + alpha(t) * sum(mask * CE(f(x_u), y')) / B_u, with alpha(t)
     the consistency ramp (`consistency_weight`, `consistency_rampup`), the
     paper's alpha_f = 3 reached at the ramp's end.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections

from semimeta_jax import errors
from semimeta_jax import losses
from semimeta_jax import schedules
from semimeta_jax.methods import base
from semimeta_jax.methods import common
from semimeta_jax.methods import options


def config_blocks():
  """The `pseudo_label` block."""
  return {'pseudo_label': ml_collections.ConfigDict({
      'threshold': 0.95,  # Smallest max-probability of an unlabeled example that is trained on.
  })}


def validate(config) -> None:
  """`pseudo_label.threshold` in [0, 1]."""
  threshold = config.pseudo_label.threshold
  errors.require(0.0 <= threshold <= 1.0, 'pseudo_label.threshold', threshold, 'must be in [0, 1]')


def pseudo_label_loss(logits, threshold):
  """(mean over the batch of mask * CE(logits, argmax), fraction of confident examples).

  The hard labels and the mask carry no gradient; an unconfident example counts in
  the batch size but adds nothing.
  """
  logits = losses.at_least_float32(logits)
  probs = jax.lax.stop_gradient(jax.nn.softmax(logits))
  labels = jnp.argmax(probs, axis=-1)
  mask = (jnp.max(probs, axis=-1) >= threshold).astype(jnp.float32)
  per_example = losses.cross_entropy_per_example(logits, labels)
  return jnp.mean(mask * per_example), jnp.mean(mask)


def objective(params, state, batch, *, weight, config):
  """CE on the labeled rows + alpha(t) * the pseudo-label loss on the unlabeled ones."""
  labeled = batch['labeled']
  num_labeled = labeled['image'].shape[0]
  images = jnp.concatenate([labeled['image'], batch['unlabeled']['image']])
  logits, stats = common.train_forward(state, params, images, state.batch_stats,
                                       state.step_key(common.DROPOUT_UNLABELED))
  supervised = losses.cross_entropy(logits[:num_labeled], labeled['label'])
  unsupervised, confident = pseudo_label_loss(logits[num_labeled:], config.pseudo_label.threshold)
  return supervised + weight * unsupervised, (stats, supervised, unsupervised, confident, logits)


def train_step(state, batch, *, config, num_classes):
  """One Pseudo-Label update. Pure: (state, batch) -> (state, metrics)."""
  del num_classes  # The labels carry it.
  labeled, unlabeled = batch['labeled'], batch['unlabeled']
  num_labeled = labeled['image'].shape[0]
  lr = options.learning_rate_schedule(config)(state.step)
  weight = schedules.consistency_weight_schedule(config)(state.step)
  loss_fn = functools.partial(objective, state=state, batch=batch, weight=weight, config=config)
  (loss, (stats, supervised, unsupervised, confident, logits)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  metrics = {
      'loss': loss,
      'supervised_loss': supervised,
      'consistency_loss': unsupervised,
      'confident_fraction': confident,
      'learning_rate': lr,
      'consistency_weight': weight,
      'train_accuracy': common.accuracy(logits[:num_labeled], labeled['label']),
  }
  return common.finish_step(state, grads, stats, metrics,
                            scored=[('unlabeled_accuracy', logits[num_labeled:], unlabeled)])


# Lee: alpha_f = 3, ramped up. Digits: linearly over the first 400 of the 1000 steps;
# CIFAR-10: over the default ramp (4000 steps).
PRESETS = {
    'digits': {'pseudo_label': {'consistency_weight': 3.0, 'consistency_rampup': 'linear',
                                'consistency_rampup_steps': 400}},
    'cifar10': {'pseudo_label': {'consistency_weight': 3.0, 'consistency_rampup': 'linear'}},
}

METHOD = base.Method(name='pseudo_label', train_step=train_step, uses_unlabeled=True,
                     config_blocks=config_blocks, validate=validate, presets=PRESETS)
