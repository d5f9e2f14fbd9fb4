"""Dual Student (Ke et al., ICCV 2019: "Breaking the Limits of the Teacher in Semi-supervised Learning").

Two students of one architecture: the first is the run's classifier
(`state.params`), the second lives in `extra['second_network']`
(`second_network.py`). Each has a class head (the model's own) and a consistency
head, a second linear layer on the same pooled features, kept beside the students
in `extra['consistency_heads']` with its own optimizer state. One step, on the
joined labeled + unlabeled batch, as the authors' code (ZHKKKe/DualStudent,
dual_student.py):

  1. Two views of the batch (`perturb.*`, drawn per step, `student_views`): student
     1's own view v1 and student 2's own view v2, each example translated and
     flipped independently in each view, as the authors' TransformTwice of
     RandomTranslateWithReflect(4) and RandomHorizontalFlip (no input noise). The
     presets turn the pipeline's own augmentation off (`data.augment`), which
     would otherwise be shared by both views. Each student runs in training mode on
     its own view (gradients) and on the other view (held constant), the two
     forwards updating its batch-norm running averages in turn.
  2. Per student s: CE of its class head on the labeled rows; a logit distance
     `logit_distance_weight` * mean (class logits - consistency logits)^2; the
     consistency w_c(t) * mean over rows and classes of (softmax(consistency
     head on its view) - softmax(class head on the other view, constant))^2.
  3. Stability of student s on an unlabeled example: its class predictions on the
     two views have the same argmax and at least one of them has a maximum
     probability above `stable_threshold` (the authors' code; the paper's
     "confident" condition). Its distance there is the consistency error of that
     example (mean over classes of the squared difference above).
  4. Stabilisation: student s learns from the other student o on an unlabeled
     example where o is stable, except where s is stable too and has the smaller
     distance (then only o learns from s; at equal distances both learn). It
     learns by the squared error between the softmax of its consistency head and
     that of o's class head (constant), summed over those examples, divided by
     the unlabeled count and weighted by w_s(t) times the unlabeled share of the
     batch, as the authors' code. (Their code writes, on every other row, the
     learner's own consistency logits as the target: a zero loss and a zero
     gradient, which the mask here states directly.)

w_c(t) = `dual_student.consistency_weight` (10) and w_s(t) =
`dual_student.stabilization_weight` (100), both times the run's consistency
weight and ramp (`consistency_weight` 1 and the 'sigmoid' ramp in the presets, the
authors' sigmoid ramp-up). The cross-entropy is averaged over the labeled rows, as
every method here (the authors divide its sum by the whole batch).

Evaluation: student 1 is the run's headline ('eval'); student 2 is its own weight
set ('eval_second').
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
from semimeta_jax.methods import second_network

HEADS = 'consistency_heads'
FIRST, SECOND = 'first', 'second'
# Sub-tags of the step's keys: per student and per view.
_STUDENT_TAG = {FIRST: 0, SECOND: 1}
OWN_VIEW, OTHER_VIEW = 0, 1


def config_blocks():
  """The `dual_student` block."""
  return {'dual_student': ml_collections.ConfigDict({
      'consistency_weight': 10.0,  # Each student's consistency between its two views (paper).
      'stabilization_weight': 100.0,  # A student learning from the other, stable one (paper).
      'stable_threshold': 0.8,  # Maximum probability above which a prediction is confident (paper).
      'logit_distance_weight': 0.01,  # Class vs consistency head logits (the authors' CIFAR script).
  })}


def validate(config) -> None:
  """Weights >= 0 and the threshold in [0, 1); the perturbation fields.

  Raises:
    errors.ConfigError: naming the field.
  """
  augment.validate(config)
  block = config.dual_student
  for name in ('consistency_weight', 'stabilization_weight', 'logit_distance_weight'):
    errors.require(block[name] >= 0, f'dual_student.{name}', block[name], 'must be >= 0')
  errors.require(0.0 <= block.stable_threshold < 1.0, 'dual_student.stable_threshold',
                 block.stable_threshold, 'must be in [0, 1)')


def init_model_state(config, *, model, image_shape, rng, params, batch_stats, num_classes):
  """`Method.init_model_state`: the second student and both consistency heads.

  Each head is a linear layer from the pooled features to the classes, drawn as
  PyTorch's Linear default (uniform in +-1/sqrt(fan_in)).
  """
  network_key, head_key = jax.random.split(rng)
  second = second_network.init(config, model=model, image_shape=image_shape, rng=network_key,
                               params=params, batch_stats=batch_stats, num_classes=num_classes)
  width = params['head']['fc']['kernel'].shape[0]
  bound = 1.0 / jnp.sqrt(width)

  def head(key):
    kernel_key, bias_key = jax.random.split(key)
    return {'kernel': jax.random.uniform(kernel_key, (width, num_classes), jnp.float32, -bound, bound),
            'bias': jax.random.uniform(bias_key, (num_classes,), jnp.float32, -bound, bound)}

  first_key, second_key = jax.random.split(head_key)
  heads = {FIRST: head(first_key), SECOND: head(second_key)}
  return {**second, HEADS: {'params': heads, 'opt_state': options.optimizer(config).init(heads)}}


def consistency_logits(head, features):
  """The consistency head's logits (float32) from pooled features."""
  return jnp.dot(losses.at_least_float32(features), head['kernel'],
                 precision=jax.lax.Precision.HIGHEST) + head['bias']


def per_example_softmax_mse(logits, other_logits):
  """Per example, the mean over classes of (softmax(logits) - softmax(other_logits))^2."""
  probs = jax.nn.softmax(losses.at_least_float32(logits))
  other = jax.nn.softmax(losses.at_least_float32(other_logits))
  return jnp.mean(jnp.square(probs - other), axis=-1)


def stable(class_own, class_other, threshold):
  """Per example: same argmax on both views and a maximum probability above `threshold` on either."""
  own = jax.nn.softmax(losses.at_least_float32(class_own))
  other = jax.nn.softmax(losses.at_least_float32(class_other))
  confident = (jnp.max(own, axis=-1) > threshold) | (jnp.max(other, axis=-1) > threshold)
  return confident & (jnp.argmax(own, axis=-1) == jnp.argmax(other, axis=-1))


def learners(stable_first, stable_second, distance_first, distance_second):
  """(first learns from second, second learns from first), per example.

  A student learns from the other where the other is stable, unless both are and
  it is the more stable one (strictly smaller distance).
  """
  both = stable_first & stable_second
  first_learns = stable_second & ~(both & (distance_first < distance_second))
  second_learns = stable_first & ~(both & (distance_second < distance_first))
  return first_learns, second_learns


def stabilization_losses(class_own, cons_own, class_other, *, num_labeled, threshold):
  """Each student's stabilisation loss (before its weight), and the masks behind it.

  Args:
    class_own: {student: class logits on its own view} (differentiated only through
      the consistency heads here: the other student's are targets).
    cons_own: {student: consistency-head logits on its own view}.
    class_other: {student: class logits on the other view}, constant.
    num_labeled: the batch's first `num_labeled` rows are labeled (never stabilised).
    threshold: `dual_student.stable_threshold`.

  Returns:
    ({student: loss}, {'<student>_stable': [B] bool, '<student>_learns': [B] bool}).
  """
  students = (FIRST, SECOND)
  frozen = jax.lax.stop_gradient
  batch_size = class_own[FIRST].shape[0]
  num_unlabeled = batch_size - num_labeled
  unlabeled_rows = jnp.arange(batch_size) >= num_labeled
  distance = {s: frozen(per_example_softmax_mse(cons_own[s], class_other[s])) for s in students}
  is_stable = {s: stable(class_own[s], class_other[s], threshold) & unlabeled_rows for s in students}
  learns = dict(zip(students, learners(is_stable[FIRST], is_stable[SECOND], distance[FIRST],
                                       distance[SECOND])))
  other = {FIRST: SECOND, SECOND: FIRST}
  result = {}
  for s in students:
    to_other = per_example_softmax_mse(cons_own[s], frozen(class_own[other[s]]))
    # The authors' weight times the unlabeled share of the batch, over the unlabeled count.
    result[s] = (num_unlabeled / batch_size) * jnp.sum(jnp.where(learns[s], to_other, 0.0)) / num_unlabeled
  masks = {**{f'{s}_stable': is_stable[s] for s in students}, **{f'{s}_learns': learns[s] for s in students}}
  return result, masks


def student_views(config, state, images):
  """{student: its own view of `images`}: each drawn from the step's key under its own sub-tag."""
  perturb = augment.from_config(config)
  return {s: perturb(state.step_key(common.NOISE, _STUDENT_TAG[s]), images) for s in (FIRST, SECOND)}


def objective(trainable, state, batch, *, consistency_weight, stabilization_weight, config):
  """The two students' losses, summed (their parameters are disjoint).

  Args:
    trainable: {'first': params, 'second': params, 'heads': {'first', 'second'}}.
    state: the TrainState (batch statistics of both students, keys).
    batch: {'labeled': {'image', 'label'}, 'unlabeled': {'image'}}.
    consistency_weight: w_c at this step.
    stabilization_weight: w_s at this step.
    config: the run configuration (`perturb.*`, `dual_student.*`).

  Returns:
    (loss, (stats of student 1, stats of student 2, {term: value}, {name: array})).
  """
  block = config.dual_student
  labeled = batch['labeled']
  num_labeled = labeled['image'].shape[0]
  images = jnp.concatenate([labeled['image'], batch['unlabeled']['image']])
  views = student_views(config, state, images)
  stats = {FIRST: state.batch_stats, SECOND: second_network.weights(state)[1]}
  other = {FIRST: SECOND, SECOND: FIRST}

  out = {}
  for s in (FIRST, SECOND):
    for view, tag in ((s, OWN_VIEW), (other[s], OTHER_VIEW)):
      logits, features, stats[s] = common.train_forward_with_features(
          state, trainable[s], views[view], stats[s],
          state.step_key(common.DROPOUT_UNLABELED, _STUDENT_TAG[s], tag))
      out[s, tag] = (logits, consistency_logits(trainable['heads'][s], features))

  class_own = {s: out[s, OWN_VIEW][0] for s in (FIRST, SECOND)}
  cons_own = {s: out[s, OWN_VIEW][1] for s in (FIRST, SECOND)}
  class_other = {s: jax.lax.stop_gradient(out[s, OTHER_VIEW][0]) for s in (FIRST, SECOND)}
  stabilization, masks = stabilization_losses(class_own, cons_own, class_other, num_labeled=num_labeled,
                                              threshold=block.stable_threshold)
  terms, total = {}, 0.0
  for s in (FIRST, SECOND):
    supervised = losses.cross_entropy(class_own[s][:num_labeled], labeled['label'])
    logit_distance = jnp.mean(jnp.square(losses.at_least_float32(class_own[s]) - cons_own[s]))
    consistency = jnp.mean(per_example_softmax_mse(cons_own[s], class_other[s]))
    total += (supervised + block.logit_distance_weight * logit_distance + consistency_weight * consistency
              + stabilization_weight * stabilization[s])
    terms.update({f'{s}_supervised_loss': supervised, f'{s}_consistency_loss': consistency,
                  f'{s}_stabilization_loss': stabilization[s], f'{s}_logit_distance': logit_distance})
    masks[f'{s}_logits'] = class_own[s]
  return total, (stats[FIRST], stats[SECOND], terms, masks)


def train_step(state, batch, *, config, num_classes):
  """One Dual Student update of both students and their heads. Pure: (state, batch) -> (state, metrics).

  Raises:
    ValueError: if the state has no second student (build it with `methods.init_train_state`).
  """
  del num_classes  # The labels carry it.
  if second_network.KEY not in state.extra or HEADS not in state.extra:
    raise ValueError('Dual Student needs a TrainState with a second student and consistency heads '
                     '(build it with methods.init_train_state).')
  block = config.dual_student
  lr = options.learning_rate_schedule(config)(state.step)
  ramp = schedules.consistency_weight_schedule(config)(state.step)
  heads = state.extra[HEADS]
  trainable = {FIRST: state.params, SECOND: second_network.weights(state)[0], 'heads': heads['params']}
  loss_fn = functools.partial(objective, state=state, batch=batch, config=config,
                              consistency_weight=block.consistency_weight * ramp,
                              stabilization_weight=block.stabilization_weight * ramp)
  (loss, (stats1, stats2, terms, masks)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
  labeled, unlabeled = batch['labeled'], batch['unlabeled']
  num_labeled = labeled['image'].shape[0]
  unlabeled_share = lambda mask: jnp.mean(mask[num_labeled:].astype(jnp.float32))
  metrics = {
      'loss': loss, **terms,
      'supervised_loss': terms['first_supervised_loss'],
      'consistency_loss': terms['first_consistency_loss'],
      'learning_rate': lr,
      'consistency_weight': block.consistency_weight * ramp,
      'stabilization_weight': block.stabilization_weight * ramp,
      'first_stable': unlabeled_share(masks['first_stable']),
      'second_stable': unlabeled_share(masks['second_stable']),
      'first_learns': unlabeled_share(masks['first_learns']),
      'second_learns': unlabeled_share(masks['second_learns']),
      'train_accuracy': common.accuracy(masks['first_logits'][:num_labeled], labeled['label']),
  }
  extra = second_network.apply_gradients(state, grads[SECOND], stats2)
  head_updates, head_opt_state = state.tx.update(grads['heads'], heads['opt_state'], heads['params'])
  extra[HEADS] = {'params': jax.tree.map(jnp.add, heads['params'], head_updates),
                  'opt_state': head_opt_state}
  new_state, metrics = common.finish_step(
      state, grads[FIRST], stats1, metrics,
      scored=[('unlabeled_accuracy', masks['first_logits'][num_labeled:], unlabeled),
              ('second_unlabeled_accuracy', masks['second_logits'][num_labeled:], unlabeled)])
  return new_state.replace(extra=extra), metrics


# Ke et al. (CIFAR, CNN-13): consistency 10, stabilisation 100, threshold 0.8, logit distance 0.01,
# sigmoid ramp-ups of 5 epochs; each view translated by up to 4 pixels (reflection padding) and
# flipped, independently, without input noise, and no augmentation shared by the two views.
# Digits: the same weights, the ramp over the run's first 200 steps, and views translated by up
# to 1 pixel (the authors' 4 of 32 pixels is an eighth of the image; an eighth of 8 pixels is 1)
# and never flipped (digits are not mirror-symmetric, which is why their pipeline has no flip).
_DIGITS = {'consistency_rampup': 'sigmoid', 'consistency_weight': 1.0, 'consistency_rampup_steps': 200,
           'data.augment': False, 'perturb.max_translation': 1, 'perturb.flip': False,
           'perturb.noise_std': 0.0}
# CIFAR-10: the ramps over 5 epochs of the 46000 unlabeled images at batch 128 (360 steps each).
PRESETS = {
    'digits': {'dual_student': _DIGITS},
    'cifar10': {'dual_student': {**_DIGITS, 'consistency_rampup_steps': 5 * 360, 'perturb.max_translation': 4,
                                 'perturb.flip': True}},
}

METHOD = base.Method(
    name='dual_student', train_step=train_step, uses_unlabeled=True, config_blocks=config_blocks,
    validate=validate, init_model_state=init_model_state,
    weight_sets=lambda config: [second_network.weight_set()],
    describe=lambda config: (f'consistency_weight={config.dual_student.consistency_weight}, '
                             f'stabilization_weight={config.dual_student.stabilization_weight}, '
                             f'stable_threshold={config.dual_student.stable_threshold}'),
    presets=PRESETS)
