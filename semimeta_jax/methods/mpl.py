"""Meta Pseudo Labels (Pham et al., CVPR 2021) on the hypergradient engine.

Two networks of the run's architecture: the student is the run's classifier
(`state.params`, evaluated as the headline 'eval'), the teacher lives in
`extra['mpl_teacher']` with its own optimizer state (and learning rate,
`mpl.teacher_learning_rate`) and is evaluated as 'eval_teacher'. One step, in the
order of the paper's Algorithm 1 and the released code:

  1. The teacher labels the unlabeled batch (training-mode forward on x_l and x_u):
     soft labels softmax(T(x_u) / tau) (`mpl.soft_labels`), or a hard label sampled
     from them.
  2. The student takes a real optimizer step on the cross-entropy to those labels
     (training mode); it sees no labeled example (`mpl.student_wait_steps`: it holds
     still for the first steps while the teacher learns).
  3. The teacher steps on its supervised cross-entropy (label smoothing
     `mpl.teacher_label_smoothing`) plus the feedback `mpl.feedback`
     (`mpl_feedback.py`): `exact` (d L_l(theta~) / d y through the student's virtual
     SGD step by the engine's `mpl.hypergrad_mode`, then through the teacher),
     `paper` (h grad CE(y^, T) with the sign `mpl.h_sign`), `released_code` (the
     released zero-gradient term), or `none` (the teacher's own loss alone).

The student's step inside the `exact` meta objective is plain SGD of size alpha =
the student's learning rate, as the paper's derivation writes it, in the same
forward as the real step (`mpl.meta_forward='train'`: the same dropout draw and
batch statistics, so its gradient is the real step's before momentum and weight
decay). The `paper` coefficient h uses the real update theta' (momentum and weight
decay included) and the real step's gradient, as Algorithm 1 does.

With `mpl.uda_weight` > 0 the teacher adds UDA on the strong view (`mpl_uda.py`), and
the student and the feedback move to that view, as in the released code.

The paper's last phase, fine-tuning the student on the labeled set, is the run's last
`mpl.finetune_steps` steps: the student takes the labeled-only cross-entropy step
(`supervised.train_step`, the same optimizer) and the teacher holds still. Those steps
run at the run's learning-rate schedule (its tail), not at a rate of their own as in
the paper: one optimizer state serves both phases, so a resume anywhere replays them. Such
a run computes both steps and keeps one (18% more per step on digits).
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax

from semimeta_jax import errors
from semimeta_jax import losses
from semimeta_jax.methods import base
from semimeta_jax.methods import common
from semimeta_jax.methods import hypergrad
from semimeta_jax.methods import mpl_feedback
from semimeta_jax.methods import mpl_uda
from semimeta_jax.methods import options
from semimeta_jax.methods import supervised

TEACHER = 'mpl_teacher'
META_FORWARDS = ('train', 'eval')
# Sub-tags of the teacher's key (common.DROPOUT_TEACHER): its two forwards and the label draw.
TEACHER_LABELED, TEACHER_UNLABELED, LABEL_SAMPLE, TEACHER_WEAK = range(4)


def config_blocks():
  """The `mpl` block."""
  return {'mpl': ml_collections.ConfigDict({
      'feedback': 'exact',  # exact | paper | released_code | none (mpl_feedback.FEEDBACKS)
      # How `exact` computes d L_l(theta~) / d y: exact | first_order | jvp | finite_difference.
      'hypergrad_mode': 'exact',
      'inner_steps': 1,  # K virtual student steps of `exact` (hypergrad_mode 'exact' unrolls K > 1).
      'epsilon': 1e-2,  # Finite-difference step of hypergrad_mode 'finite_difference', relative to ||v||.
      'meta_forward': 'train',  # The student's forward inside the feedback: train (the real step's) | eval.
      'soft_labels': True,  # The student learns softmax(T / tau) (exact, released code) or a sampled label (paper).
      'temperature': 1.0,  # tau of the teacher's labels.
      'h_sign': 1.0,  # `paper`: +1 the derivation's h ~ L_l(old) - L_l(new); -1 the released code's sign.
      'baseline_decay': 0.99,  # `released_code`: b <- b - (1 - decay) (b - h) before h - b.
      'teacher_learning_rate': 0.0,  # Peak rate of the teacher's schedule; 0 = config.learning_rate.
      'teacher_label_smoothing': 0.0,  # Of the teacher's supervised cross-entropy.
      'student_wait_steps': 0,  # The student holds still (no update) for this many first steps.
      # The last N steps fine-tune the student on the labeled batch alone; the teacher holds.
      'finetune_steps': 0,
      **mpl_uda.fields(),  # The teacher's UDA term (off by default; mpl_uda.py).
  })}


def validate(config) -> None:
  """The `mpl` block's fields, and the pairs that contradict each other.

  Raises:
    errors.ConfigError: naming the field.
  """
  require, block = errors.require, config.mpl
  require(block.feedback in mpl_feedback.FEEDBACKS, 'mpl.feedback', block.feedback,
          f'expected one of {mpl_feedback.FEEDBACKS}')
  require(block.hypergrad_mode in hypergrad.MODES, 'mpl.hypergrad_mode', block.hypergrad_mode,
          f'expected one of {mpl_feedback.LABEL_GRADIENT_MODES}')
  require(block.hypergrad_mode in mpl_feedback.LABEL_GRADIENT_MODES, 'mpl.hypergrad_mode',
          block.hypergrad_mode,
          f'expected one of {mpl_feedback.LABEL_GRADIENT_MODES}: the student learns by cross-entropy, '
          'whose Gauss-Newton Hessian is not the squared error\'s (2/B_u) J^T J that neumann and '
          'implicit are built on, and the teacher\'s labels are not the student\'s prediction, so '
          'the residual they assume zero is not')
  require(isinstance(block.inner_steps, int) and block.inner_steps >= 1, 'mpl.inner_steps',
          block.inner_steps, 'must be an integer >= 1')
  require(block.inner_steps == 1 or block.hypergrad_mode == 'exact', 'mpl.inner_steps',
          block.inner_steps, f'K > 1 virtual steps need mpl.hypergrad_mode="exact" '
          f'({block.hypergrad_mode!r} is a K = 1 formula)')
  require(block.epsilon > 0, 'mpl.epsilon', block.epsilon, 'must be > 0')
  require(block.meta_forward in META_FORWARDS, 'mpl.meta_forward', block.meta_forward,
          f'expected one of {META_FORWARDS}')
  require(block.temperature > 0, 'mpl.temperature', block.temperature, 'must be > 0')
  require(block.soft_labels or block.feedback != 'exact', 'mpl.soft_labels', block.soft_labels,
          'must be True with mpl.feedback="exact": its meta-gradient runs through the soft labels '
          'softmax(T / tau); a sampled label has no derivative (mpl.feedback="paper" takes it)')
  require(not block.soft_labels or block.feedback != 'paper', 'mpl.soft_labels', block.soft_labels,
          'must be False with mpl.feedback="paper": its score-function feedback needs a label '
          'sampled from the teacher')
  require(block.h_sign in (1, -1), 'mpl.h_sign', block.h_sign, 'must be 1 or -1')
  require(0 <= block.baseline_decay < 1, 'mpl.baseline_decay', block.baseline_decay,
          'must be in [0, 1)')
  require(block.teacher_learning_rate >= 0, 'mpl.teacher_learning_rate', block.teacher_learning_rate,
          'must be >= 0 (0 = config.learning_rate)')
  require(0 <= block.teacher_label_smoothing < 1, 'mpl.teacher_label_smoothing',
          block.teacher_label_smoothing, 'must be in [0, 1)')
  require(isinstance(block.student_wait_steps, int) and block.student_wait_steps >= 0,
          'mpl.student_wait_steps', block.student_wait_steps, 'must be an integer >= 0')
  require(isinstance(block.finetune_steps, int) and 0 <= block.finetune_steps < config.num_train_steps,
          'mpl.finetune_steps', block.finetune_steps,
          f'must be an integer in [0, num_train_steps={config.num_train_steps}): the steps before '
          'them train the teacher and the student together')
  mpl_uda.validate(config)


def student_images(batch, config):
  """The unlabeled images the student learns on and the feedback is taken on: the strong view with UDA."""
  return batch['unlabeled']['strong_image' if mpl_uda.enabled(config) else 'image']


def teacher_optimizer(config) -> optax.GradientTransformation:
  """The run's optimizer with the teacher's peak learning rate (`mpl.teacher_learning_rate`)."""
  if config.mpl.teacher_learning_rate <= 0:
    return options.optimizer(config)
  teacher_config = config.copy_and_resolve_references()
  teacher_config.learning_rate = config.mpl.teacher_learning_rate
  return options.optimizer(teacher_config)


def init_teacher(config, *, model, image_shape, rng, params, batch_stats, num_classes):
  """`Method.init_model_state`: the teacher, its optimizer state and the released code's baseline."""
  del params, batch_stats, num_classes  # The teacher shares nothing with the student.
  params_key, dropout_key = jax.random.split(rng)
  variables = model.init({'params': params_key, 'dropout': dropout_key},
                         jnp.zeros((1, *image_shape), jnp.float32), train=False)
  teacher_params = variables['params']
  return {TEACHER: {'params': teacher_params, 'batch_stats': variables.get('batch_stats', {}),
                    'opt_state': teacher_optimizer(config).init(teacher_params),
                    'baseline': jnp.zeros((), jnp.float32)}}


def teacher_weights(state):
  """(params, batch statistics) of the teacher."""
  teacher = state.extra[TEACHER]
  return teacher['params'], teacher['batch_stats']


def supervised_loss(logits, labels, *, num_classes: int, smoothing):
  """Cross-entropy to the labels smoothed by `smoothing` (0: the plain cross-entropy)."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
  return jnp.mean(optax.losses.softmax_cross_entropy(losses.at_least_float32(logits), targets))


def _hold_until(step, wait_steps: int, before, after):
  """`after`, or `before` while `step < wait_steps` (the waiting student's state)."""
  if wait_steps <= 0:
    return after
  waiting = step < wait_steps
  return jax.tree.map(lambda old, new: jnp.where(waiting, old, new), before, after)


def feedback_surrogate(config, state, new_student_params, student_grads, *, batch, teacher_logits_u,
                       labels, student_apply, lr):
  """The feedback term as a function of the teacher's unlabeled logits, and what it reports.

  Returns:
    (surrogate: logits -> scalar, {metric: value}, the released code's new baseline or None).
  """
  block = config.mpl
  labeled, x_u = batch['labeled'], student_images(batch, config)
  outer = lambda params: hypergrad.outer_loss(params, student_apply, labeled['image'], labeled['label'])
  if block.feedback == 'exact':
    grad_labels = mpl_feedback.label_gradient(
        block.hypergrad_mode, student_apply, state.params, labeled['image'], labeled['label'], x_u,
        labels, alpha=lr, inner_steps=block.inner_steps, epsilon=block.epsilon)
    return (lambda logits: mpl_feedback.exact_surrogate(logits, grad_labels, block.temperature),
            {'label_gradient_norm': jnp.linalg.norm(grad_labels)}, None)
  if block.feedback == 'paper':
    h = block.h_sign * mpl_feedback.paper_coefficient(jax.grad(outer)(new_student_params),
                                                      student_grads, lr)
    return (lambda logits: mpl_feedback.paper_surrogate(logits, labels, h, block.temperature),
            {'feedback_coefficient': h}, None)
  if block.feedback == 'released_code':
    h, baseline = mpl_feedback.released_code_coefficient(
        outer(new_student_params), outer(state.params), state.extra[TEACHER]['baseline'],
        baseline_decay=block.baseline_decay)
    return (lambda logits: mpl_feedback.released_code_surrogate(logits, h),
            {'feedback_coefficient': h, 'feedback_baseline': baseline}, baseline)
  return (lambda logits: jnp.zeros((), jnp.float32)), {}, None


def teacher_pass(state, batch, *, config, label_key=None):
  """The teacher's training-mode forwards, linearised, and its labels of the student's images.

  Args:
    label_key: the key of the sampled labels (default: the step's own).

  Returns:
    (logits, vjp, batch statistics, labels, student targets): `logits` is
    {'labeled', 'unlabeled'} (the student's images, `student_images`) and, with UDA,
    'weak' (the weak view); `vjp` pulls a dict of their cotangents back to the
    teacher's parameters; the labels are soft ([B_u, C]) or sampled (int [B_u]), and
    the student's targets their distributions (held constant).
  """
  block, teacher, key = config.mpl, state.extra[TEACHER], state.step_key
  images = {'labeled': batch['labeled']['image'], 'unlabeled': student_images(batch, config)}
  if mpl_uda.enabled(config):
    images['weak'] = batch['unlabeled']['image']
  tags = {'labeled': TEACHER_LABELED, 'unlabeled': TEACHER_UNLABELED, 'weak': TEACHER_WEAK}

  def forward(params):
    stats, logits = teacher['batch_stats'], {}
    for part in images:  # One forward per part, each with its own batch statistics, in this order.
      logits[part], stats = common.train_forward(state, params, images[part], stats,
                                                 key(common.DROPOUT_TEACHER, tags[part]))
    return logits, stats

  logits, vjp, stats = jax.vjp(forward, teacher['params'], has_aux=True)
  logits_u = logits['unlabeled']
  if block.soft_labels:
    labels = jax.lax.stop_gradient(mpl_feedback.soft_labels(logits_u, block.temperature))
    return logits, vjp, stats, labels, labels
  if label_key is None:
    label_key = key(common.DROPOUT_TEACHER, LABEL_SAMPLE)
  labels = mpl_feedback.sampled_labels(label_key, logits_u, block.temperature)
  return logits, vjp, stats, labels, jax.nn.one_hot(labels, logits_u.shape[-1], dtype=jnp.float32)


def student_step(state, batch, targets, *, config):
  """The student's real optimizer step on the teacher's labels (held while it waits).

  Returns:
    (state with the student updated, its loss, its gradient, its logits on x_u, metrics).
  """
  x_u = student_images(batch, config)

  def loss_fn(params):
    logits, stats = common.train_forward(state, params, x_u, state.batch_stats,
                                         state.step_key(common.DROPOUT_UNLABELED))
    return mpl_feedback.soft_cross_entropy(logits, targets), (stats, logits)

  (loss, (stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  stepped, metrics = common.finish_step(state, grads, stats, {},
                                        scored=[('unlabeled_accuracy', logits, batch['unlabeled'])])
  held = _hold_until(state.step, config.mpl.student_wait_steps,
                     (state.params, state.batch_stats, state.opt_state),
                     (stepped.params, stepped.batch_stats, stepped.opt_state))
  new_state = stepped.replace(params=held[0], batch_stats=held[1], opt_state=held[2])
  return new_state, loss, grads, logits, metrics


def student_meta_apply(state, config):
  """`(params, x) -> logits` of the student inside the feedback (`mpl.meta_forward`).

  'train' is the real step's forward (its dropout draw and batch statistics; the
  statistics it computes are dropped: the feedback only reads the student).
  """
  if config.mpl.meta_forward == 'train':
    key = state.step_key(common.DROPOUT_UNLABELED)
    return lambda params, x: common.train_forward(state, params, x, state.batch_stats, key)[0]
  return lambda params, x: common.eval_forward(state, params, x)


def _feedback(state, batch, config, label_key=None):
  """Every part of a step up to the teacher's objective: shared by the step and `feedback_gradient`."""
  lr = options.learning_rate_schedule(config)(state.step)
  logits, vjp, stats, labels, targets = teacher_pass(state, batch, config=config, label_key=label_key)
  new_state, loss, grads, student_u, metrics = student_step(state, batch, targets, config=config)
  # A waiting student takes no step, so its learning rate in the feedback is 0 too.
  student_lr = jnp.where(state.step < config.mpl.student_wait_steps, 0.0, lr)
  surrogate, feedback_metrics, baseline = feedback_surrogate(
      config, state, new_state.params, grads, batch=batch, teacher_logits_u=logits['unlabeled'],
      labels=labels, student_apply=student_meta_apply(state, config), lr=student_lr)
  metrics.update(feedback_metrics, loss=loss, learning_rate=lr)
  return logits, vjp, stats, surrogate, baseline, new_state, metrics


def feedback_gradient(state, batch, *, config, label_key=None):
  """The teacher-parameter gradient of the feedback term alone, as the step computes it.

  For the ablation (experiments/mpl_ablation.py): the same forwards, labels and
  student step as `train_step`, without the teacher's supervised loss.
  """
  logits, vjp, _, surrogate, _, _, _ = _feedback(state, batch, config, label_key)
  cotangents = jax.tree.map(jnp.zeros_like, logits)
  cotangents['unlabeled'] = jax.grad(surrogate)(logits['unlabeled'])
  return vjp(cotangents)[0]


def train_step(state, batch, *, config, num_classes):
  """One Meta Pseudo Labels update, or in the last `mpl.finetune_steps` steps a fine-tuning one.

  Pure: (state, batch) -> (state, metrics). Both kinds report the same metrics (a
  fine-tuning step reports the teacher's as 0) and 'finetuning' (1 in that phase).

  Raises:
    ValueError: if the state has no teacher (build it with `methods.init_train_state`).
  """
  if TEACHER not in state.extra:
    raise ValueError('Meta Pseudo Labels needs a TrainState with a teacher '
                     '(build it with methods.init_train_state).')
  trained_state, trained_metrics = mpl_step(state, batch, config=config)
  trained = trained_state, {**trained_metrics, 'finetuning': jnp.zeros((), jnp.float32)}
  if config.mpl.finetune_steps <= 0:
    return trained
  tuned_state, tuned_metrics = finetune_step(state, batch, config=config, num_classes=num_classes)
  # MPL's metrics: the fine-tuning step's own where the names agree, 0 for the teacher's.
  tuned = tuned_state, {name: jnp.asarray(tuned_metrics.get(name, 0.0), value.dtype)
                        for name, value in trained[1].items()} | {'finetuning': jnp.ones((), jnp.float32)}
  finetuning = state.step >= config.num_train_steps - config.mpl.finetune_steps
  # Both computed, one kept: XLA:CPU ran the MPL step 13x slower inside a lax.cond's branch
  # (digits, batch 64 + 64: 11.5 s against 0.84 s a step, under load); computing the fine-tuning
  # step beside it costs 18% (0.99 s), and only in runs that ask for the phase.
  return jax.tree.map(lambda tuned, trained: jnp.where(finetuning, tuned, trained), tuned, trained)


def finetune_step(state, batch, *, config, num_classes):
  """The fine-tuning phase's step: the student's labeled-only step; the teacher and its baseline hold."""
  return supervised.train_step(state, batch, config=config, num_classes=num_classes)


def mpl_step(state, batch, *, config):
  """One Meta Pseudo Labels update of the student and the teacher: (state, metrics)."""
  block, labeled, teacher = config.mpl, batch['labeled'], state.extra[TEACHER]
  logits, vjp, teacher_stats, surrogate, baseline, new_state, metrics = _feedback(state, batch, config)
  uda_weight = mpl_uda.weight(config, state.step)

  # The teacher's step: its supervised loss (+ UDA) plus the feedback, pulled back through its forwards.
  def teacher_objective(logits):
    terms = {'teacher_supervised_loss': supervised_loss(
        logits['labeled'], labeled['label'], num_classes=logits['labeled'].shape[-1],
        smoothing=block.teacher_label_smoothing), 'feedback_loss': surrogate(logits['unlabeled'])}
    total = terms['teacher_supervised_loss'] + terms['feedback_loss']
    if 'weak' in logits:
      terms['uda_loss'], terms['uda_mask_fraction'] = mpl_uda.loss(
          logits['weak'], logits['unlabeled'], temperature=block.uda_temperature,
          threshold=block.uda_threshold)
      total = total + uda_weight * terms['uda_loss']
    return total, terms

  (teacher_loss, terms), logit_grads = jax.value_and_grad(teacher_objective, has_aux=True)(logits)
  (teacher_grads,) = vjp(logit_grads)
  teacher_l, teacher_u = logits['labeled'], logits['unlabeled']
  updates, teacher_opt_state = teacher_optimizer(config).update(
      teacher_grads, teacher['opt_state'], teacher['params'])
  new_teacher = {'params': optax.apply_updates(teacher['params'], updates),
                 'batch_stats': teacher_stats, 'opt_state': teacher_opt_state,
                 'baseline': teacher['baseline'] if baseline is None else baseline}
  new_state = new_state.replace(extra=dict(new_state.extra, **{TEACHER: new_teacher}))
  if 'weak' in logits:
    metrics['uda_weight'] = uda_weight
  metrics.update(terms)
  metrics.update({
      'teacher_loss': teacher_loss,
      'teacher_grad_norm': optax.tree.norm(teacher_grads),
      'teacher_train_accuracy': common.accuracy(teacher_l, labeled['label']),
  })
  if 'label' in batch['unlabeled']:
    metrics['pseudo_label_accuracy'] = common.accuracy(teacher_u, batch['unlabeled']['label'])
  return new_state, metrics


def describe(config) -> str:
  """The feedback's settings, for the run plan."""
  block = config.mpl
  details = {'exact': f'{block.hypergrad_mode}, K={block.inner_steps}, meta forward {block.meta_forward}',
             'paper': f'h_sign={block.h_sign:+g}, sampled labels',
             'released_code': f'baseline decay {block.baseline_decay}', 'none': 'teacher loss alone'}
  labels = 'soft' if block.soft_labels else 'sampled'
  finetune = (f'; the last {block.finetune_steps} steps fine-tune the student on the labels'
              if block.finetune_steps else '')
  return (f'feedback {block.feedback} ({details[block.feedback]}), {labels} labels, '
          f'tau={block.temperature}{finetune}')


def weight_set() -> base.WeightSet:
  """The teacher as a weight set of the evaluation ('eval_teacher')."""
  return base.WeightSet(prefix='eval_teacher', select=teacher_weights)


_PAPER = {'mpl.feedback': 'paper', 'mpl.soft_labels': False}
# Digits: the run's schedule and learning rate for both networks.
_DIGITS = {
    'mpl_exact': {'mpl.feedback': 'exact'},
    'mpl_paper': dict(_PAPER),
    'mpl_released_code': {'mpl.feedback': 'released_code'},
    'mpl_no_feedback': {'mpl.feedback': 'none'},
    # The paper's last phase: steps 700-999 fine-tune the student (learning rate 0.01 after
    # step 700, 0.001 after 900).
    'mpl_exact_finetune': {'mpl.feedback': 'exact', 'mpl.finetune_steps': 300},
}
# The released code's CIFAR-10-4000 flags: WRN-28-2, learning rates 0.1, weight decay 5e-4, label
# smoothing 0.15, EMA 0.995 (of the student, evaluated beside it), student wait 3000 steps, 300k
# steps, batch 128 labeled + 7 x 128 unlabeled, the teacher's UDA (temperature 0.7, threshold 0.6,
# weight 8, ramp 5000 steps) on RandAugment at magnitude 16. WRN-28-2 here has no dropout (0.2 in
# the flags), and the learning-rate schedule is configs/cifar10.py's.
_CIFAR10 = {'model': 'wrn28_2', 'learning_rate': 0.1, 'mpl.teacher_learning_rate': 0.1,
            'weight_decay': 5e-4, 'mpl.teacher_label_smoothing': 0.15, 'ema.decay': 0.995,
            'mpl.student_wait_steps': 3000, 'num_train_steps': 300_000, 'labeled_batch_size': 128,
            'unlabeled_batch_size': 7 * 128, 'mpl.uda_weight': 8.0, 'mpl.uda_temperature': 0.7,
            'mpl.uda_threshold': 0.6, 'mpl.uda_rampup_steps': 5000, 'data.randaugment.magnitude': 16.0}
PRESETS = {
    'digits': _DIGITS,
    'cifar10': {'mpl_released_code': {**_CIFAR10, 'mpl.feedback': 'released_code'},
                'mpl_paper': {**_CIFAR10, **_PAPER}, 'mpl_exact': {**_CIFAR10, 'mpl.feedback': 'exact'}},
}

METHOD = base.Method(
    name='mpl', train_step=train_step, uses_unlabeled=True, config_blocks=config_blocks,
    validate=validate, init_model_state=init_teacher, strong_view=mpl_uda.enabled,
    weight_sets=lambda config: [weight_set()], describe=describe, presets=PRESETS)
