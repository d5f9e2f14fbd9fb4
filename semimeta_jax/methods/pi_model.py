"""The Pi-model (Laine & Aila, "Temporal Ensembling for Semi-Supervised Learning", ICLR 2017).

One training step:
  1. The labeled and unlabeled batches are joined into one batch x (the reference
     code trains on mixed minibatches, so batch norm sees both).
  2. Two views of x, each with its own translation and Gaussian input noise
     (`methods/augment.py`), go through the network in training mode under
     different dropout masks: logits z and z~. The second forward continues from
     the batch statistics of the first, as two PyTorch/Theano forwards would.
  3. loss = CE(z on the labeled part) + w(t) * mean over examples *and classes* of
     (softmax(z) - softmax(z~))^2, on every example of x.

Choices, following the paper and its reference code (s-laine/tempens):
  * Both branches receive gradient: the paper's Pi-model has no stop-gradient
    (only Temporal Ensembling's targets are constant), and its code
    differentiates through both predictions.
  * The squared error is averaged over classes (Theano's `T.mean`), so the
    papers' consistency weights carry over: the paper's w_max is 100 scaled by
    the labeled fraction of the data.
  * The cross-entropy is averaged over the labeled examples; the reference code
    divides it by the whole mixed minibatch, which only rescales it.
  * The ramp-up of w(t) is `config.consistency_rampup` ('sigmoid' is the paper's
    exp(-5 (1 - t/T)^2)); the paper's Adam and its learning-rate ramp-down are
    replaced by this project's shared optimizer and schedule.
"""

import functools

import jax
import jax.numpy as jnp

from semimeta_jax import losses
from semimeta_jax import schedules
from semimeta_jax.methods import augment
from semimeta_jax.methods import base
from semimeta_jax.methods import common
from semimeta_jax.methods import options
from semimeta_jax.methods import sntg

NUM_VIEWS = 2


def softmax_mse(logits: jax.Array, other_logits: jax.Array) -> jax.Array:
  """Mean over examples and classes of (softmax(logits) - softmax(other_logits))^2.

  Gradients flow into both arguments; callers stop them where a target is fixed.
  """
  probs = jax.nn.softmax(losses.at_least_float32(logits))
  other = jax.nn.softmax(losses.at_least_float32(other_logits))
  return jnp.mean(jnp.square(probs - other))


def objective(params, state, batch, *, weight, config):
  """The Pi-model loss of two stochastic views of the joined batch.

  Args:
    params: the parameters (differentiated through both views).
    state: the TrainState (batch statistics, per-step keys).
    batch: {'labeled': {'image', 'label'}, 'unlabeled': {'image', ...}}.
    weight: the consistency weight w(t).
    config: the run configuration (perturbation fields are read).

  Returns:
    (loss, (batch statistics after both forwards, supervised loss, consistency
    loss, logits of the first view over the joined labeled + unlabeled batch,
    *SNTG's aux tail)). SNTG's features are the first view's, its target the second's.
  """
  labeled = batch['labeled']
  num_labeled = labeled['image'].shape[0]
  images = jnp.concatenate([labeled['image'], batch['unlabeled']['image']])
  perturb = augment.from_config(config)
  stats, logits, features = state.batch_stats, [], []
  for view in range(NUM_VIEWS):
    # Each view has its own perturbation and dropout mask; the second forward
    # continues from the first one's batch statistics.
    view_images = perturb(state.step_key(common.NOISE, view), images)
    view_logits, view_features, stats = sntg.student_forward(
        config, state, params, view_images, stats, state.step_key(common.DROPOUT_UNLABELED, view))
    logits.append(view_logits)
    features.append(view_features)
  supervised = losses.cross_entropy(logits[0][:num_labeled], labeled['label'])
  consistency = softmax_mse(logits[0], logits[1])
  loss, sntg_aux = sntg.regularize(supervised + weight * consistency, config, state, weight, features[0],
                                   logits[1], labeled['label'])
  return loss, (stats, supervised, consistency, logits[0], *sntg_aux)


def train_step(state, batch, *, config, num_classes):
  """One Pi-model update. Pure: (state, batch) -> (state, metrics)."""
  del num_classes  # The labels carry it.
  labeled, unlabeled = batch['labeled'], batch['unlabeled']
  num_labeled = labeled['image'].shape[0]
  lr = options.learning_rate_schedule(config)(state.step)
  weight = schedules.consistency_weight_schedule(config)(state.step)

  loss_fn = functools.partial(objective, state=state, batch=batch, weight=weight, config=config)
  (loss, (stats, supervised, consistency, logits, *sntg_aux)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  metrics = {
      'loss': loss,
      'supervised_loss': supervised,
      'consistency_loss': consistency,
      'learning_rate': lr,
      'consistency_weight': weight,
      'train_accuracy': common.accuracy(logits[:num_labeled], labeled['label']),
      **sntg.metrics(sntg_aux),
  }
  return common.finish_step(state, grads, stats, metrics,
                            scored=[('unlabeled_accuracy', logits[num_labeled:], unlabeled)])


# Laine & Aila: sigmoid ramp, w_max = 100 times the labeled fraction (4000 / 50000 on
# CIFAR-10), input noise 0.15 and 2-pixel translations. On 8x8 digits (50 of 1497 labeled) the
# weight is 10 and a shift of at most 1 pixel (2 is a quarter of the image).
PRESETS = {
    'digits': {'pi_model': {'consistency_rampup': 'sigmoid', 'consistency_weight': 10.0,
                            'perturb.max_translation': 1}},
    'cifar10': {'pi_model': {'consistency_rampup': 'sigmoid', 'consistency_weight': 8.0,
                             'perturb.max_translation': 2, 'perturb.noise_std': 0.15}},
}

METHOD = base.Method(name='pi_model', train_step=train_step, uses_unlabeled=True,
                     validate=augment.validate,
                     presets=PRESETS)
