"""Mean Teacher (Tarvainen & Valpola, "Mean teachers are better role models", NeurIPS 2017).

The teacher is the exponential moving average of the student's weights and batch
statistics, kept by the `ema` option (`methods/ema.py`). One training step:
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
  4. An optimizer step on the student, then the teacher update (the `ema` option's,
     with this method's `ema_decay`)
     teacher <- a_t teacher + (1 - a_t) student, with
     a_t = min(config.ema.decay, 1 - 1 / (t + 1)) and t the number of optimizer
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

from semimeta_jax import errors
from semimeta_jax import losses
from semimeta_jax import schedules
from semimeta_jax.methods import augment
from semimeta_jax.methods import base
from semimeta_jax.methods import common
from semimeta_jax.methods import ema
from semimeta_jax.methods import options
from semimeta_jax.methods import pi_model
from semimeta_jax.methods import sntg

# Views (perturbation sub-keys) of the student and the teacher.
STUDENT_VIEW, TEACHER_VIEW = 0, 1


def validate(config):
  """The teacher is the EMA of the student: `config.ema.decay` must be in (0, 1).

  Raises:
    errors.ConfigError: naming the field.
  """
  augment.validate(config)
  errors.require(0.0 < config.ema.decay < 1.0, 'ema.decay', config.ema.decay,
                 'mean_teacher needs 0 < ema_decay < 1 (the teacher is the EMA of the student, '
                 'e.g. 0.999)')


def teacher_decay(config, step: jax.Array) -> jax.Array:
  """EMA decay of the teacher update that follows optimizer step `step` (0-based).

  min(ema_decay, 1 - 1 / (t + 1)) with t = step + 1 updates taken after it.
  """
  updates_taken = jnp.asarray(step, jnp.float32) + 1.0
  return jnp.minimum(config.ema.decay, 1.0 - 1.0 / (updates_taken + 1.0))


def objective(params, teacher_params, state, batch, *, weight, config):
  """The student's loss, with the teacher's predictions as constant targets.

  Args:
    params: the student's parameters (differentiated).
    teacher_params: the teacher's parameters (no gradient reaches them).
    state: the TrainState (batch statistics, the teacher's batch statistics, keys).
    batch: {'labeled': {'image', 'label'}, 'unlabeled': {'image', ...}}.
    weight: the consistency weight w(t).
    config: the run configuration (perturbation fields are read).

  Returns:
    (loss, (batch statistics, supervised loss, consistency loss, student logits,
    teacher logits, *SNTG's aux tail)); logits are over the joined labeled + unlabeled batch.
  """
  labeled = batch['labeled']
  num_labeled = labeled['image'].shape[0]
  images = jnp.concatenate([labeled['image'], batch['unlabeled']['image']])
  perturb = augment.from_config(config)
  student_view = perturb(state.step_key(common.NOISE, STUDENT_VIEW), images)
  teacher_view = perturb(state.step_key(common.NOISE, TEACHER_VIEW), images)

  logits, features, stats = sntg.student_forward(config, state, params, student_view, state.batch_stats,
                                                 state.step_key(common.DROPOUT_UNLABELED))
  teacher_logits, _ = common.train_forward(state, teacher_params, teacher_view, ema.weights(state)[1],
                                           state.step_key(common.DROPOUT_TEACHER))
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  supervised = losses.cross_entropy(logits[:num_labeled], labeled['label'])
  consistency = pi_model.softmax_mse(logits, teacher_logits)
  loss, sntg_aux = sntg.regularize(supervised + weight * consistency, config, state, weight, features,
                                   teacher_logits, labeled['label'])
  return loss, (stats, supervised, consistency, logits, teacher_logits, *sntg_aux)


def train_step(state, batch, *, config, num_classes):
  """One Mean Teacher update. Pure: (state, batch) -> (state, metrics).

  `config` is checked by `validate` (through the registry) before the step is built.

  Raises:
    ValueError: if the state keeps no EMA (build it with `methods.init_train_state`).
  """
  del num_classes  # The labels carry it.
  if ema.NAME not in state.extra:
    raise ValueError('Mean Teacher needs a TrainState with an EMA (build it with methods.init_train_state).')
  labeled, unlabeled = batch['labeled'], batch['unlabeled']
  num_labeled = labeled['image'].shape[0]
  lr = options.learning_rate_schedule(config)(state.step)
  weight = schedules.consistency_weight_schedule(config)(state.step)

  loss_fn = functools.partial(objective, teacher_params=ema.weights(state)[0], state=state,
                              batch=batch, weight=weight, config=config)
  (loss, (stats, supervised, consistency, logits, teacher_logits, *sntg_aux)), grads = (
      jax.value_and_grad(loss_fn, has_aux=True)(state.params))
  metrics = {
      'loss': loss,
      'supervised_loss': supervised,
      'consistency_loss': consistency,
      'learning_rate': lr,
      'consistency_weight': weight,
      'ema_decay': teacher_decay(config, state.step),
      'train_accuracy': common.accuracy(logits[:num_labeled], labeled['label']),
      **sntg.metrics(sntg_aux),
  }
  # The teacher update follows, in the `ema` option's wrapper, with `teacher_decay`.
  return common.finish_step(
      state, grads, stats, metrics,
      scored=[('unlabeled_accuracy', logits[num_labeled:], unlabeled),
              ('teacher_unlabeled_accuracy', teacher_logits[num_labeled:], unlabeled)])


_DIGITS = {'consistency_rampup': 'sigmoid', 'consistency_weight': 10.0, 'ema.decay': 0.99,
           'ema.headline': True, 'perturb.max_translation': 1}
# Tarvainen & Valpola (CIFAR-10, ConvLarge): consistency weight 100 on the class-averaged squared
# error, sigmoid ramp, teacher decay 0.999 (after the warm-up above), evaluated on the teacher.
# Digits: the Pi-model's scale (weight 10, 1-pixel shifts) and decay 0.99 for the short run; with
# fast-SWA (Athiwaratkun et al.) 3 cosine cycles of 150 steps after the 1000-step main run (the
# paper's 30-epoch cycles after 180 epochs, in proportion), averaged every 25 steps (about one
# unlabeled epoch) and batch statistics over 23 batches (one epoch).
PRESETS = {
    'digits': {
        'mean_teacher': _DIGITS,
        'mean_teacher_fast_swa': {
            **_DIGITS, 'num_train_steps': 1450, 'fast_swa.cycles': 3, 'fast_swa.cycle_steps': 150,
            'fast_swa.average_every_steps': 25, 'fast_swa.lr_max': 0.05, 'fast_swa.lr_min': 0.001,
            'fast_swa.bn_update_batches': 23},
    },
    'cifar10': {'mean_teacher': {'consistency_rampup': 'sigmoid', 'consistency_weight': 100.0,
                                 'ema.decay': 0.999, 'ema.headline': True,
                                 'perturb.max_translation': 2, 'perturb.noise_std': 0.15}},
    # ImageNet (ResNet-18): the authors' ImageNet weight 10 and decay 0.9997, sigmoid ramp over 5
    # epochs; the two views differ by a shift of up to 16 pixels and a flip each (ResNet-18 has no
    # dropout and the pipeline's crop is shared by both views).
    'imagenet': {'mean_teacher': {'consistency_rampup': 'sigmoid', 'consistency_weight': 10.0,
                                  'rampup_epochs': 5, 'ema.decay': 0.9997, 'ema.headline': True,
                                  'perturb.max_translation': 16, 'perturb.flip': True,
                                  'perturb.noise_std': 0.0}},
}

METHOD = base.Method(name='mean_teacher', train_step=train_step, uses_unlabeled=True,
                     validate=validate, keeps_ema=lambda config: True, ema_decay=teacher_decay,
                     presets=PRESETS)
