"""Meta Pseudo Labels' training step: each network's update rebuilt in float64, the variants, the checks."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from semimeta_jax import errors
from semimeta_jax import methods
from semimeta_jax.methods import common
from semimeta_jax.methods import mpl
from semimeta_jax.methods import mpl_feedback
from tests.conftest import synthetic_batch, tiny_config
from tests.tiny_net import TinyNet

STUDENT_LR, TEACHER_LR = 0.05, 0.02
TEMPERATURE, SMOOTHING = 0.7, 0.1


def plain_sgd_config(**mpl_fields):
  """Plain SGD (no momentum or decay), so that each update is -lr * its gradient."""
  return tiny_config(method='mpl', momentum=0.0, weight_decay=0.0, dropout_rate=0.0,
                     learning_rate=STUDENT_LR,
                     **{'mpl.teacher_learning_rate': TEACHER_LR, 'mpl.temperature': TEMPERATURE,
                        'mpl.teacher_label_smoothing': SMOOTHING,
                        **{f'mpl.{k}': v for k, v in mpl_fields.items()}})


def initial_state(config, dtype=jnp.float32):
  state = methods.init_train_state(config, TinyNet(num_classes=10), (8, 8, 1), jax.random.key(0),
                                   num_classes=10)
  floating = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  return jax.tree.map(floating, state)


def take_step(config, state, batch):
  return jax.jit(methods.make_train_step(config, 10))(state, batch)


def train_logits(params, stats, x):
  """TinyNet in training mode (batch statistics; dropout 0), and its updated running averages."""
  logits, updates = TinyNet(num_classes=10).apply({'params': params, 'batch_stats': stats}, x, train=True,
                                                  mutable=['batch_stats'])
  return logits, updates['batch_stats']


def smoothed_cross_entropy(logits, labels):
  targets = (1 - SMOOTHING) * jax.nn.one_hot(labels, 10) + SMOOTHING / 10
  return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1))


def cross_entropy(logits, labels):
  return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(labels.shape[0]), labels])


def teacher_logits(teacher, phi, batch):
  logits_l, stats = train_logits(phi, teacher['batch_stats'], batch['labeled']['image'])
  return logits_l, train_logits(phi, stats, batch['unlabeled']['image'])[0]


def float64_batch():
  return jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x,
                      synthetic_batch(jax.random.key(1)))


@pytest.mark.slow
def test_exact_step_updates_both_networks_by_their_rebuilt_gradients():
  with jax.enable_x64(True):
    config = plain_sgd_config(feedback='exact')
    state, batch = initial_state(config, jnp.float64), float64_batch()
    new_state, metrics = take_step(config, state, batch)
    teacher, theta, stats = state.extra[mpl.TEACHER], state.params, state.batch_stats
    x_l, y_l, x_u = batch['labeled']['image'], batch['labeled']['label'], batch['unlabeled']['image']

    def student_unlabeled_loss(params, targets):
      return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(train_logits(params, stats, x_u)[0]), -1))

    def teacher_objective(phi):
      logits_l, logits_u = teacher_logits(teacher, phi, batch)
      targets = jax.nn.softmax(logits_u / TEMPERATURE)
      grads = jax.grad(student_unlabeled_loss)(theta, targets)
      adapted = jax.tree.map(lambda p, g: p - STUDENT_LR * g, theta, grads)
      meta = cross_entropy(train_logits(adapted, stats, x_l)[0], y_l)
      return smoothed_cross_entropy(logits_l, y_l) + meta

    teacher_grads = jax.grad(teacher_objective)(teacher['params'])
    expected_teacher = jax.tree.map(lambda p, g: p - TEACHER_LR * g, teacher['params'], teacher_grads)
    chex.assert_trees_all_close(new_state.extra[mpl.TEACHER]['params'], expected_teacher, rtol=1e-10, atol=1e-12)

    targets = jax.nn.softmax(teacher_logits(teacher, teacher['params'], batch)[1] / TEMPERATURE)
    student_grads = jax.grad(student_unlabeled_loss)(theta, targets)
    expected_student = jax.tree.map(lambda p, g: p - STUDENT_LR * g, theta, student_grads)
    chex.assert_trees_all_close(new_state.params, expected_student, rtol=1e-10, atol=1e-12)
    # The feedback is there: without it the teacher's step is its supervised loss's alone.
    supervised_only = jax.grad(lambda p: smoothed_cross_entropy(teacher_logits(teacher, p, batch)[0], y_l))
    difference = optax.tree.norm(jax.tree.map(jnp.subtract, supervised_only(teacher['params']), teacher_grads))
    assert float(difference) > 1e-4 and float(metrics['label_gradient_norm']) > 0


@pytest.mark.slow
@pytest.mark.parametrize('h_sign', [1.0, -1.0])
def test_paper_step_scales_the_sampled_labels_cross_entropy_by_h(h_sign):
  with jax.enable_x64(True):
    config = plain_sgd_config(feedback='paper', soft_labels=False, h_sign=h_sign)
    state, batch = initial_state(config, jnp.float64), float64_batch()
    new_state, metrics = take_step(config, state, batch)
    teacher, theta, stats = state.extra[mpl.TEACHER], state.params, state.batch_stats
    x_l, y_l, x_u = batch['labeled']['image'], batch['labeled']['label'], batch['unlabeled']['image']
    logits_u = teacher_logits(teacher, teacher['params'], batch)[1]
    hard = jax.random.categorical(state.step_key(common.DROPOUT_TEACHER, mpl.LABEL_SAMPLE),
                                  logits_u / TEMPERATURE)
    unlabeled = lambda p: cross_entropy(train_logits(p, stats, x_u)[0], hard)
    new_theta = jax.tree.map(lambda p, g: p - STUDENT_LR * g, theta, jax.grad(unlabeled)(theta))
    chex.assert_trees_all_close(new_state.params, new_theta, rtol=1e-10, atol=1e-12)
    labeled_grads = jax.grad(lambda p: cross_entropy(train_logits(p, stats, x_l)[0], y_l))(new_theta)
    h = h_sign * STUDENT_LR * optax.tree.vdot(labeled_grads, jax.grad(unlabeled)(theta))
    np.testing.assert_allclose(float(metrics['feedback_coefficient']), float(h), rtol=1e-10)

    def teacher_objective(phi):
      logits_l, logits_u = teacher_logits(teacher, phi, batch)
      return smoothed_cross_entropy(logits_l, y_l) + h * cross_entropy(logits_u / TEMPERATURE, hard)

    expected = jax.tree.map(lambda p, g: p - TEACHER_LR * g, teacher['params'],
                            jax.grad(teacher_objective)(teacher['params']))
    chex.assert_trees_all_close(new_state.extra[mpl.TEACHER]['params'], expected, rtol=1e-10, atol=1e-12)


def test_released_code_teacher_steps_as_without_feedback_and_keeps_its_baseline():
  with jax.enable_x64(True):
    config = plain_sgd_config(feedback='released_code', baseline_decay=0.9)
    state, batch = initial_state(config, jnp.float64), float64_batch()
    released, metrics = take_step(config, state, batch)
    alone, _ = take_step(plain_sgd_config(feedback='none'), state, batch)
    chex.assert_trees_all_close(released.extra[mpl.TEACHER]['params'],
                                alone.extra[mpl.TEACHER]['params'], rtol=1e-13, atol=1e-15)
    chex.assert_trees_all_equal(released.params, alone.params)  # The same labels, the same student step.
    # The teacher's running averages after its two training-mode forwards, x_l then x_u.
    teacher = state.extra[mpl.TEACHER]
    stats = train_logits(teacher['params'], teacher['batch_stats'], batch['labeled']['image'])[1]
    stats = train_logits(teacher['params'], stats, batch['unlabeled']['image'])[1]
    chex.assert_trees_all_close(released.extra[mpl.TEACHER]['batch_stats'], stats, rtol=1e-12)
    # b <- 0 - 0.1 (0 - d), h = d - b with d = L_l(new) - L_l(old): a coefficient that is not
    # zero, so the zero gradient is the term's own, not a zero weight.
    x_l, y_l = batch['labeled']['image'], batch['labeled']['label']
    loss = lambda p: cross_entropy(train_logits(p, state.batch_stats, x_l)[0], y_l)
    difference = float(loss(released.params) - loss(state.params))
    np.testing.assert_allclose(float(released.extra[mpl.TEACHER]['baseline']), 0.1 * difference,
                               rtol=1e-9)
    np.testing.assert_allclose(float(metrics['feedback_coefficient']), 0.9 * difference, rtol=1e-9)
    assert abs(difference) > 1e-6


def test_the_step_traces_once_and_a_waiting_student_holds_still():
  config = plain_sgd_config(feedback='exact', student_wait_steps=2)
  state, batch = initial_state(config), synthetic_batch(jax.random.key(1))
  chex.clear_trace_counter()
  step = methods.make_train_step(config, 10)
  traced = jax.jit(chex.assert_max_traces(lambda s, b: step(s, b), n=1))
  states = [state]
  for _ in range(3):
    states.append(traced(states[-1], batch)[0])
  teacher = lambda s: s.extra[mpl.TEACHER]['params']
  chex.assert_trees_all_equal(states[2].params, state.params)  # Two steps of waiting.
  assert optax.tree.norm(jax.tree.map(jnp.subtract, states[3].params, states[2].params)) > 0
  assert optax.tree.norm(jax.tree.map(jnp.subtract, teacher(states[1]), teacher(state))) > 0
  assert int(states[3].step) == 3


def test_the_last_finetune_steps_train_the_student_on_the_labels_and_hold_the_teacher():
  # 4 steps, the last 2 fine-tuning: steps 0-1 are MPL's, steps 2-3 the labeled-only step's.
  with jax.enable_x64(True):
    config = plain_sgd_config(feedback='exact', finetune_steps=2)
    config.num_train_steps = 4
    state, batch = initial_state(config, jnp.float64), float64_batch()
    chex.clear_trace_counter()
    train_step = methods.make_train_step(config, 10)
    step = jax.jit(chex.assert_max_traces(lambda s, b: train_step(s, b), n=1))
    states, rows = [state], []
    for _ in range(4):
      new_state, metrics = step(states[-1], batch)
      states.append(new_state)
      rows.append(metrics)
    without_phase, without_metrics = take_step(plain_sgd_config(feedback='exact'), states[1], batch)
    # Before the phase: the MPL step itself (both networks move).
    chex.assert_trees_all_close(states[2], without_phase, rtol=1e-12, atol=1e-14)
    assert set(rows[0]) == set(without_metrics) | {'finetuning'}
    assert [float(row['finetuning']) for row in rows] == [0.0, 0.0, 1.0, 1.0]
    # In it: the teacher and its baseline hold; the student takes -lr * grad of its labeled
    # cross-entropy (plain SGD) in training mode, with the running averages that forward leaves.
    for before, after in ((states[2], states[3]), (states[3], states[4])):
      chex.assert_trees_all_equal(after.extra, before.extra)
      x_l, y_l = batch['labeled']['image'], batch['labeled']['label']
      loss = lambda p: cross_entropy(train_logits(p, before.batch_stats, x_l)[0], y_l)
      expected = jax.tree.map(lambda p, g: p - STUDENT_LR * g, before.params, jax.grad(loss)(before.params))
      chex.assert_trees_all_close(after.params, expected, rtol=1e-10, atol=1e-12)
      chex.assert_trees_all_close(after.batch_stats, train_logits(before.params, before.batch_stats, x_l)[1],
                                  rtol=1e-12)
    np.testing.assert_allclose(float(rows[3]['loss']),
                               float(cross_entropy(train_logits(states[3].params, states[3].batch_stats,
                                                                batch['labeled']['image'])[0],
                                                   batch['labeled']['label'])), rtol=1e-10)
    assert float(rows[3]['teacher_loss']) == 0.0  # The teacher's metrics read 0 in the phase.


@pytest.mark.parametrize('fields,field,message', [
    ({'mpl.feedback': 'exact', 'mpl.hypergrad_mode': 'neumann'}, 'mpl.hypergrad_mode', 'Gauss-Newton'),
    ({'mpl.feedback': 'exact', 'mpl.hypergrad_mode': 'implicit'}, 'mpl.hypergrad_mode', 'Gauss-Newton'),
    ({'mpl.hypergrad_mode': 'jvp', 'mpl.inner_steps': 2}, 'mpl.inner_steps', 'K = 1 formula'),
    ({'mpl.feedback': 'exact', 'mpl.soft_labels': False}, 'mpl.soft_labels', 'no derivative'),
    ({'mpl.feedback': 'paper', 'mpl.soft_labels': True}, 'mpl.soft_labels', 'sampled'),
    ({'mpl.feedback': 'paper', 'mpl.soft_labels': False, 'mpl.h_sign': 0.5}, 'mpl.h_sign', '1 or -1'),
    ({'mpl.feedback': 'typo'}, 'mpl.feedback', 'expected one of'),
    ({'mpl.temperature': 0.0}, 'mpl.temperature', '> 0'),
    ({'mpl.baseline_decay': 1.0}, 'mpl.baseline_decay', '[0, 1)'),
    ({'mpl.student_wait_steps': -1}, 'mpl.student_wait_steps', '>= 0'),
    ({'mpl.finetune_steps': 10 ** 9}, 'mpl.finetune_steps', 'must be an integer in [0, num_train_steps='),
    ({'mpl.finetune_steps': -1}, 'mpl.finetune_steps', 'must be an integer in [0'),
])
def test_unusable_fields_are_one_line_naming_the_field(fields, field, message):
  config = tiny_config(method='mpl', **fields)
  with pytest.raises(errors.ConfigError, match=re.escape(message)) as raised:
    methods.configure(config)
  assert field in str(raised.value) and '\n' not in str(raised.value)


def test_presets_name_the_variants_and_configure():
  for dataset in ('digits', 'cifar10'):
    presets = methods.presets(dataset)
    for name in ('mpl_exact', 'mpl_paper', 'mpl_released_code') + (('mpl_no_feedback',) if dataset == 'digits' else ()):
      config = methods.apply_preset(tiny_config(), dataset, name)
      assert config.method == 'mpl' and presets[name]['method'] == 'mpl'
      methods.configure(config)
  cifar = methods.presets('cifar10')['mpl_paper']
  assert cifar['mpl.teacher_label_smoothing'] == 0.15 and cifar['unlabeled_batch_size'] == 7 * 128
  assert cifar['mpl.student_wait_steps'] == 3000 and cifar['ema.decay'] == 0.995


@pytest.mark.slow
def test_uda_teacher_term_and_the_student_on_the_strong_view():
  with jax.enable_x64(True):
    config = plain_sgd_config(feedback='none', uda_weight=2.0, uda_rampup_steps=8, uda_temperature=0.5,
                              uda_threshold=0.3)
    assert methods.configure(config).strong_view and not methods.configure(plain_sgd_config()).strong_view
    state, batch = initial_state(config, jnp.float64).replace(step=jnp.asarray(2, jnp.int32)), float64_batch()
    batch['unlabeled']['strong_image'] = jax.random.normal(jax.random.key(5), batch['unlabeled']['image'].shape)
    new_state, metrics = take_step(config, state, batch)
    teacher, theta, stats = state.extra[mpl.TEACHER], state.params, state.batch_stats
    x_l, y_l = batch['labeled']['image'], batch['labeled']['label']
    weak, strong = batch['unlabeled']['image'], batch['unlabeled']['strong_image']

    def teacher_forwards(phi):  # x_l, then the strong view (the student's), then the weak view.
      logits_l, running = train_logits(phi, teacher['batch_stats'], x_l)
      logits_s, running = train_logits(phi, running, strong)
      return logits_l, logits_s, train_logits(phi, running, weak)[0]

    def teacher_objective(phi):
      logits_l, logits_s, logits_w = teacher_forwards(phi)
      targets = jax.lax.stop_gradient(jax.nn.softmax(logits_w / 0.5))
      mask = jnp.max(targets, axis=-1) >= 0.3
      uda = jnp.mean(mask * -jnp.sum(targets * jax.nn.log_softmax(logits_s), axis=-1))
      return smoothed_cross_entropy(logits_l, y_l) + 2.0 * (2 / 8) * uda, jnp.mean(mask)

    grads, kept = jax.grad(teacher_objective, has_aux=True)(teacher['params'])
    assert 0.0 < float(kept) < 1.0  # Some rows masked, some kept.
    np.testing.assert_allclose(float(metrics['uda_mask_fraction']), float(kept))
    expected_teacher = jax.tree.map(lambda p, g: p - TEACHER_LR * g, teacher['params'], grads)
    chex.assert_trees_all_close(new_state.extra[mpl.TEACHER]['params'], expected_teacher, rtol=1e-10, atol=1e-12)
    targets = jax.nn.softmax(teacher_forwards(teacher['params'])[1] / TEMPERATURE)
    student_loss = lambda p: -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(train_logits(p, stats, strong)[0]), -1))
    expected_student = jax.tree.map(lambda p, g: p - STUDENT_LR * g, theta, jax.grad(student_loss)(theta))
    chex.assert_trees_all_close(new_state.params, expected_student, rtol=1e-10, atol=1e-12)
