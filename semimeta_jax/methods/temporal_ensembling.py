"""Temporal Ensembling (Laine & Aila, "Temporal Ensembling for Semi-Supervised Learning", ICLR 2017).

Every training example i keeps an ensemble prediction Z_i, an exponential moving
average of the network's predictions z_i for it: Z_i <- a Z_i + (1 - a) z_i with
a = `config.temporal_ensembling.momentum` (the paper's alpha = 0.6). The training target is
the startup-corrected z~_i = Z_i / (1 - a^t), which is unbiased from the first
update on (Z starts at zero).

The paper updates Z once per epoch, after the epoch. Here the update is per
example, each time the example is seen, and t counts that example's updates
(`visits`). Because a stream visits each example of its pool once per epoch (the
pool is permuted epoch by epoch), this is the paper's per-epoch EMA with each
example's target taken from the epochs before the current one; it needs no epoch
boundary in the step, and the labeled stream, whose epochs are shorter, simply
ensembles more often. Z and the counts live in `TrainState.extra`, indexed by
train-split index (the batch carries each example's 'index'), so they are
replicated, checkpointed and the same on any device count.

One training step, on the joined labeled + unlabeled batch as in the Pi-model:
  1. one stochastic view (translation, Gaussian noise, dropout) through the network
     in training mode: z = softmax(logits);
  2. loss = CE(labeled part) + w(t) * mean over examples and classes of
     (z - z~)^2, z~ constant; an example never seen before has no target yet and
     adds nothing (the paper's first-epoch targets are zeros under a zero weight);
     w(t) ramps up by `config.consistency_rampup` ('sigmoid': exp(-5 (1 - t/T)^2),
     the paper's ramp);
  3. the optimizer step, then Z and the counts are updated with this step's z.
An example drawn twice in one batch (an epoch boundary, or a labeled example also
in the unlabeled pool) is updated twice, in batch order (`update_ensemble`).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections

from semimeta_jax import errors
from semimeta_jax import losses
from semimeta_jax import schedules
from semimeta_jax.methods import augment
from semimeta_jax.methods import base
from semimeta_jax.methods import common
from semimeta_jax.methods import options
from semimeta_jax.methods import sntg


def config_blocks():
  """The `temporal_ensembling` block."""
  # Z <- a Z + (1 - a) z per example at each visit, target Z / (1 - a^visits); a = the paper's alpha.
  return {'temporal_ensembling': ml_collections.ConfigDict({'momentum': 0.6})}


def validate(config) -> None:
  """`temporal_ensembling.momentum` in [0, 1) and the perturbation fields."""
  augment.validate(config)
  momentum = config.temporal_ensembling.momentum
  errors.require(0.0 <= momentum < 1.0, 'temporal_ensembling.momentum', momentum,
                 'must be in [0, 1) (the paper uses 0.6)')


def init_extra_state(config, *, num_train: int, num_classes: int):
  """Zero ensemble predictions and visit counts for every training example."""
  del config
  return {'ensemble': jnp.zeros((num_train, num_classes), jnp.float32),
          'visits': jnp.zeros((num_train,), jnp.int32)}


def targets(extra, indices, momentum):
  """(z~, has_target): the startup-corrected ensemble of each index, and whether it exists."""
  visits = extra['visits'][indices]
  has_target = visits > 0
  correction = 1.0 - jnp.power(momentum, visits.astype(jnp.float32))
  safe = jnp.where(has_target, correction, 1.0)
  return extra['ensemble'][indices] / safe[:, None], has_target


def update_ensemble(extra, indices, predictions, momentum):
  """Z_i <- a Z_i + (1 - a) z_i for each row, in batch order, and visits_i += 1.

  Rows with the same index are folded in sequence: an index seen n times ends at
  a^n Z_i + (1 - a) sum_k a^(n - 1 - r_k) z_k, r_k the row's rank among them. Only
  the last of those rows writes, so the scatter has no colliding writes and is
  deterministic on every backend.
  """
  same = indices[:, None] == indices[None, :]
  rank = jnp.sum(jnp.tril(same, k=-1), axis=1)  # Earlier rows with this index.
  occurrences = jnp.sum(same, axis=1)
  exponents = jnp.clip(occurrences[:, None] - 1 - rank[None, :], 0)
  weights = jnp.where(same, (1.0 - momentum) * jnp.power(momentum, exponents.astype(jnp.float32)), 0.0)
  decay = jnp.power(momentum, occurrences.astype(jnp.float32))[:, None]
  new_rows = decay * extra['ensemble'][indices] + jnp.matmul(
      weights, predictions.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  num_train = extra['visits'].shape[0]
  writes = jnp.where(rank == occurrences - 1, indices, num_train)  # Out of range: dropped.
  return {
      'ensemble': extra['ensemble'].at[writes].set(new_rows, mode='drop'),
      'visits': extra['visits'].at[writes].set(extra['visits'][indices] + occurrences, mode='drop'),
  }


def objective(params, state, images, labels, ensemble_targets, has_target, *, weight, config):
  """CE on the labeled rows plus w(t) times the squared error to the ensemble targets.

  Returns:
    (loss, (batch statistics, supervised loss, consistency loss, logits, *SNTG's aux tail)).
  """
  view = augment.from_config(config)(state.step_key(common.NOISE), images)
  logits, features, stats = sntg.student_forward(config, state, params, view, state.batch_stats,
                                                 state.step_key(common.DROPOUT_UNLABELED))
  supervised = losses.cross_entropy(logits[:labels.shape[0]], labels)
  probs = jax.nn.softmax(losses.at_least_float32(logits))
  per_example = jnp.mean(jnp.square(probs - ensemble_targets), axis=-1)
  # Divided by the whole batch, not by the examples with a target: an example's
  # weight in the loss does not depend on how many others have been seen.
  consistency = jnp.mean(jnp.where(has_target, per_example, 0.0))
  # SNTG's graph: the ensemble's argmax, the network's own where there is no ensemble yet.
  loss, sntg_aux = sntg.regularize(supervised + weight * consistency, config, state, weight, features,
                                   jnp.where(has_target[:, None], ensemble_targets, probs), labels)
  return loss, (stats, supervised, consistency, logits, *sntg_aux)


def train_step(state, batch, *, config, num_classes):
  """One Temporal Ensembling update. Pure: (state, batch) -> (state, metrics)."""
  del num_classes  # The buffer's width carries it.
  labeled, unlabeled = batch['labeled'], batch['unlabeled']
  num_labeled = labeled['image'].shape[0]
  images = jnp.concatenate([labeled['image'], unlabeled['image']])
  indices = jnp.concatenate([labeled['index'], unlabeled['index']]).astype(jnp.int32)
  momentum = config.temporal_ensembling.momentum
  lr = options.learning_rate_schedule(config)(state.step)
  weight = schedules.consistency_weight_schedule(config)(state.step)
  ensemble_targets, has_target = targets(state.extra, indices, momentum)

  loss_fn = functools.partial(objective, state=state, images=images, labels=labeled['label'],
                              ensemble_targets=ensemble_targets, has_target=has_target,
                              weight=weight, config=config)
  (loss, (stats, supervised, consistency, logits, *sntg_aux)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  predictions = jax.lax.stop_gradient(jax.nn.softmax(losses.at_least_float32(logits)))
  metrics = {
      'loss': loss,
      'supervised_loss': supervised,
      'consistency_loss': consistency,
      'learning_rate': lr,
      'consistency_weight': weight,
      'ensemble_coverage': jnp.mean(has_target.astype(jnp.float32)),
      'train_accuracy': common.accuracy(logits[:num_labeled], labeled['label']),
      **sntg.metrics(sntg_aux),
  }
  new_state, metrics = common.finish_step(
      state, grads, stats, metrics,
      scored=[('unlabeled_accuracy', logits[num_labeled:], unlabeled),
              ('ensemble_unlabeled_accuracy', ensemble_targets[num_labeled:], unlabeled)])
  ensemble = update_ensemble(state.extra, indices, predictions, momentum)
  return new_state.replace(extra=dict(new_state.extra, **ensemble)), metrics


# Laine & Aila: alpha = 0.6, sigmoid ramp, w_max = 30 times the labeled fraction on CIFAR-10;
# the digits settings are the Pi-model's (weight 10, 1-pixel shifts).
PRESETS = {
    'digits': {'temporal_ensembling': {'consistency_rampup': 'sigmoid', 'consistency_weight': 10.0,
                                       'perturb.max_translation': 1, 'temporal_ensembling.momentum': 0.6}},
    'cifar10': {'temporal_ensembling': {'consistency_rampup': 'sigmoid', 'consistency_weight': 2.4,
                                        'perturb.max_translation': 2, 'perturb.noise_std': 0.15,
                                        'temporal_ensembling.momentum': 0.6}},
}

METHOD = base.Method(
    name='temporal_ensembling', train_step=train_step, uses_unlabeled=True,
    config_blocks=config_blocks,
    renamed_fields={'ensemble_momentum': 'temporal_ensembling.momentum'},
    validate=validate, init_extra_state=init_extra_state,
    presets=PRESETS)
