"""Mean Teacher (Tarvainen & Valpola, "Mean teachers are better role models", NeurIPS 2017).

The teacher is the exponential moving average of the student's weights and batch
statistics (`state.ema_params`, `state.ema_batch_stats`). One training step:
  1. The labeled and unlabeled batches are joined into one batch x, as the paper's
     mixed minibatches.
  2. The student sees one view of x and the teacher another (own translation,
     Gaussian input noise and dropout mask; `methods/augment.py`). Both forwards
     run in training mode, as the reference code's `ema_model.train()`: the teacher
     normalises with the batch's statistics, and its running averages come from
     the EMA alone (the statistics its forward computes are dropped).
  3. loss = CE(student on the labeled part) + w(t) * mean over examples and
     classes of (softmax(student) - stop_gradient(softmax(teacher)))^2, on every
     example of x; w(t) ramps up by `config.consistency_rampup` ('sigmoid' is the
     paper's exp(-5 (1 - t/T)^2)).
  4. An optimizer step on the student, then the teacher update
     teacher <- a_t teacher + (1 - a_t) student, with
     a_t = min(config.ema_decay, 1 - 1 / (t + 1)) and t the number of optimizer
     updates, this one included. The cap is the reference PyTorch code's warm-up: early on the teacher is
     the plain average of every student iterate (initialisation included) instead
     of being dominated by the random initialisation.

As in the Pi-model (`pi_model.py`), the squared error is averaged over classes so
that the paper's consistency weights carry over, and the cross-entropy is averaged
over the labeled examples.
"""

import functools

import jax
import jax.numpy as jnp
import optax

from semimeta_jax import errors
from semimeta_jax import losses
from semimeta_jax import schedules
from semimeta_jax.methods import augment
from semimeta_jax.methods import base
from semimeta_jax.methods import common
from semimeta_jax.methods import pi_model

# Views (perturbation sub-keys) of the student and the teacher.
STUDENT_VIEW, TEACHER_VIEW = 0, 1


def validate(config):
  """The teacher is the EMA of the student: `config.ema_decay` must be in (0, 1).

  Raises:
    errors.ConfigError: naming the field.
  """
  augment.validate(config)
  errors.require(0.0 < config.ema_decay < 1.0, 'ema_decay', config.ema_decay,
                 'mean_teacher needs 0 < ema_decay < 1 (the teacher is the EMA of the student, '
                 'e.g. 0.999)')


def teacher_decay(config, step: jax.Array) -> jax.Array:
  """EMA decay of the teacher update that follows optimizer step `step` (0-based).

  min(ema_decay, 1 - 1 / (t + 1)) with t = step + 1 updates taken after it.
  """
  updates_taken = jnp.asarray(step, jnp.float32) + 1.0
  return jnp.minimum(config.ema_decay, 1.0 - 1.0 / (updates_taken + 1.0))


def objective(params, teacher_params, state, batch, *, weight, config):
  """The student's loss, with the teacher's predictions as constant targets.

  Args:
    params: the student's parameters (differentiated).
    teacher_params: the teacher's parameters (no gradient reaches them).
    state: the TrainState (batch statistics, EMA batch statistics, keys).
    batch: {'labeled': {'image', 'label'}, 'unlabeled': {'image', ...}}.
    weight: the consistency weight w(t).
    config: the run configuration (perturbation fields are read).

  Returns:
    (loss, (batch statistics, supervised loss, consistency loss, student logits,
    teacher logits)); logits are over the joined labeled + unlabeled batch.
  """
  labeled = batch['labeled']
  num_labeled = labeled['image'].shape[0]
  images = jnp.concatenate([labeled['image'], batch['unlabeled']['image']])
  perturb = augment.from_config(config)
  student_view = perturb(state.step_key(common.NOISE, STUDENT_VIEW), images)
  teacher_view = perturb(state.step_key(common.NOISE, TEACHER_VIEW), images)

  logits, stats = common.train_forward(state, params, student_view, state.batch_stats,
                                       state.step_key(common.DROPOUT_UNLABELED))
  teacher_logits, _ = common.train_forward(state, teacher_params, teacher_view, state.ema_batch_stats,
                                           state.step_key(common.DROPOUT_TEACHER))
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  supervised = losses.cross_entropy(logits[:num_labeled], labeled['label'])
  consistency = pi_model.softmax_mse(logits, teacher_logits)
  return supervised + weight * consistency, (stats, supervised, consistency, logits, teacher_logits)


def train_step(state, batch, *, config, num_classes):
  """One Mean Teacher update. Pure: (state, batch) -> (state, metrics).

  `config` is checked by `validate` (through the registry) before the step is built.

  Raises:
    ValueError: if the state keeps no EMA (build it with `methods.init_train_state`).
  """
  del num_classes  # The labels carry it.
  if state.ema_params is None:
    raise ValueError('Mean Teacher needs a TrainState with an EMA (use_ema=True).')
  labeled, unlabeled = batch['labeled'], batch['unlabeled']
  num_labeled = labeled['image'].shape[0]
  lr = schedules.learning_rate_schedule(config)(state.step)
  weight = schedules.consistency_weight_schedule(config)(state.step)

  loss_fn = functools.partial(objective, teacher_params=state.ema_params, state=state, batch=batch,
                              weight=weight, config=config)
  (loss, (stats, supervised, consistency, logits, teacher_logits)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  decay = teacher_decay(config, state.step)
  new_state = state.apply_gradients(grads=grads, batch_stats=stats, ema_decay=decay)
  metrics = {
      'loss': loss,
      'supervised_loss': supervised,
      'consistency_loss': consistency,
      'learning_rate': lr,
      'consistency_weight': weight,
      'ema_decay': decay,
      'train_accuracy': common.accuracy(logits[:num_labeled], labeled['label']),
      'grad_norm': optax.tree.norm(grads),
  }
  if 'label' in unlabeled:  # A truly unlabeled pool has no labels to score.
    metrics['unlabeled_accuracy'] = common.accuracy(logits[num_labeled:], unlabeled['label'])
    metrics['teacher_unlabeled_accuracy'] = common.accuracy(teacher_logits[num_labeled:],
                                                            unlabeled['label'])
  return new_state, metrics


METHOD = base.Method(name='mean_teacher', train_step=train_step, uses_unlabeled=True,
                     validate=validate, keeps_ema=lambda config: True)
