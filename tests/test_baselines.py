"""The consistency baselines: Pi-model, Mean Teacher, and their input perturbations."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semimeta_jax import methods
from semimeta_jax import models
from semimeta_jax import schedules
from semimeta_jax import state as state_lib
from semimeta_jax import validation
from semimeta_jax.methods import augment
from semimeta_jax.methods import mean_teacher
from semimeta_jax.methods import pi_model
from tests.conftest import synthetic_batch, tiny_config

NUM_STEPS = 30
RAMPUP_STEPS, MAX_WEIGHT, EMA_DECAY = 4, 3.0, 0.6
NO_PERTURBATION = {'input_noise_std': 0.0, 'max_translation': 0, 'perturb_flip': False}


def traceable(step):
  """A plain function around a partial, which chex's trace counter needs."""
  chex.clear_trace_counter()  # The counter is keyed by code object, shared across tests.
  return lambda state, batch: step(state, batch)


def baseline_config(method, **overrides):
  fields = dict(method=method, dropout_rate=0.0, learning_rate=0.1, consistency_rampup='sigmoid',
                consistency_rampup_steps=RAMPUP_STEPS, consistency_weight=MAX_WEIGHT, ema_decay=0.0)
  if method == 'mean_teacher':
    fields['ema_decay'] = EMA_DECAY
  fields.update(overrides)
  return tiny_config(**fields)


# Dropout does not change a model's variables, so every test starts from this one
# compiled initialisation (compiling is what costs time on CPU).
_MODEL = models.get_model(tiny_config(), 10)
_init_variables = jax.jit(lambda key: _MODEL.init({'params': key}, jnp.zeros((1, 8, 8, 1)), train=False))


def fresh_state(config, seed=0):
  variables = _init_variables(jax.random.key(seed))
  params, batch_stats = variables['params'], variables['batch_stats']
  extra = methods.configure(config).init_extra(num_train=0, num_classes=10)(params, batch_stats)
  return state_lib.TrainState.create(
      apply_fn=models.get_model(config, 10).apply, params=params,
      batch_stats=batch_stats, tx=schedules.sgd_with_coupled_weight_decay(config),
      rng=jax.random.key(seed + 1), extra=extra)


def run(config, num_steps, seed=1):
  """Trains on one fixed batch; returns the states (initial one first) and the metrics."""
  state = fresh_state(config)
  batch = synthetic_batch(jax.random.key(seed))
  step = jax.jit(chex.assert_max_traces(traceable(methods.make_train_step(config, 10)), n=1))
  states, history = [state], []
  for _ in range(num_steps):
    state, metrics = step(state, batch)
    states.append(state)
    history.append(jax.tree.map(float, metrics))
  return states, history


@pytest.fixture(scope='module', params=['pi_model', 'mean_teacher'])
def trained(request):
  # A 1-pixel shift instead of 2: on 8x8 noise images with random labels, larger
  # shifts leave too little to memorise for a short test.
  return request.param, *run(baseline_config(request.param, max_translation=1), NUM_STEPS)


def test_perturbations_are_off_when_disabled_and_per_example_otherwise():
  images = jax.random.normal(jax.random.key(0), (16, 8, 8, 1))
  key = jax.random.key(1)
  # Jitted: eager dispatch compiles each small operation separately, which is slower.
  translate = jax.jit(augment.translate, static_argnums=2)
  perturb = jax.jit(augment.perturb, static_argnames=('max_translation', 'flip', 'noise_std'))
  off = perturb(key, images, max_translation=0, flip=False, noise_std=0.0)
  chex.assert_trees_all_equal(off, images)
  centred = translate(images, jnp.full((16, 2), 2), 2)
  chex.assert_trees_all_equal(centred, images)
  shifted = translate(images, jnp.tile(jnp.array([[2, 3]]), (16, 1)), 2)
  chex.assert_trees_all_equal(shifted[:, :, :-1], images[:, :, 1:])  # One pixel to the left.
  flipped = perturb(key, images, max_translation=0, flip=True, noise_std=0.0)
  same = np.all(flipped == images, axis=(1, 2, 3))
  mirrored = np.all(flipped == images[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same | mirrored) and same.any() and mirrored.any()
  noisy = perturb(key, images, max_translation=0, flip=False, noise_std=0.15)
  assert 0.12 < float(jnp.std(noisy - images)) < 0.18
  moved = perturb(key, images, max_translation=2, flip=False, noise_std=0.0)
  shifts = [(dy, dx) for dy in range(5) for dx in range(5)]
  matches = np.stack([np.all(moved == translate(images, jnp.tile(jnp.array([s]), (16, 1)), 2),
                             axis=(1, 2, 3)) for s in shifts])
  assert np.all(matches.any(axis=0))  # Every example is one of the 25 shifts...
  assert len(set(matches.argmax(axis=0))) > 4  # ...drawn per example.


@pytest.mark.slow
def test_trains_and_compiles_once(trained):
  method, states, history = trained
  assert int(states[-1].step) == NUM_STEPS
  supervised = [m['supervised_loss'] for m in history]
  assert np.mean(supervised[-5:]) < 0.75 * supervised[0], (method, supervised)
  required = {'loss', 'supervised_loss', 'consistency_loss', 'learning_rate', 'consistency_weight',
              'unlabeled_accuracy'}
  assert required <= set(history[0])
  for metrics in history[1:]:
    assert metrics['consistency_loss'] > 0
    total = metrics['supervised_loss'] + metrics['consistency_weight'] * metrics['consistency_loss']
    np.testing.assert_allclose(metrics['loss'], total, rtol=1e-5)


def test_consistency_weight_follows_the_sigmoid_rampup(trained):
  _, _, history = trained
  for step, metrics in enumerate(history):
    expected = MAX_WEIGHT * np.exp(-5.0 * (1.0 - min(step / RAMPUP_STEPS, 1.0)) ** 2)
    np.testing.assert_allclose(metrics['consistency_weight'], expected, rtol=1e-6)
  assert history[0]['consistency_weight'] < 0.03 * MAX_WEIGHT
  assert history[-1]['consistency_weight'] == MAX_WEIGHT


def test_teacher_is_the_ema_of_the_student(trained):
  method, states, _ = trained
  if method != 'mean_teacher':
    assert 'ema' not in states[-1].extra  # The Pi-model keeps no average at ema.decay=0.
    return
  teacher = jax.tree.map(np.asarray, states[0].params)
  teacher_stats = jax.tree.map(np.asarray, states[0].batch_stats)
  for t, state in enumerate(states[1:], start=1):
    # The reference warm-up: while 1 - 1/(t+1) < decay, the teacher is the plain mean of all iterates.
    decay = min(EMA_DECAY, 1.0 - 1.0 / (t + 1))
    average = lambda old, new, a=decay: a * old + (1.0 - a) * np.asarray(new)
    teacher = jax.tree.map(average, teacher, state.params)
    teacher_stats = jax.tree.map(average, teacher_stats, state.batch_stats)
    chex.assert_trees_all_close(state.extra['ema']['params'], teacher, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(state.extra['ema']['batch_stats'], teacher_stats, rtol=1e-5, atol=1e-6)
  # The teacher lags the student: it is an average, not a copy.
  assert not np.allclose(jax.tree.leaves(states[-1].extra['ema']['params'])[0],
                         jax.tree.leaves(states[-1].params)[0])


@pytest.mark.slow
def test_teacher_targets_carry_no_gradient():
  config = baseline_config('mean_teacher')
  state = fresh_state(config)
  batch = synthetic_batch(jax.random.key(3))
  other_teacher = fresh_state(config, seed=7).params

  @jax.jit
  def consistency_and_grads(teacher):
    loss = lambda p, t: mean_teacher.objective(p, t, state, batch, weight=1.0, config=config)
    (_, aux), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(state.params, teacher)
    return aux[2], grads

  consistency, (student_grad, teacher_grad) = consistency_and_grads(other_teacher)
  # The term depends on the teacher's weights, yet none of its gradient reaches them.
  assert abs(float(consistency) - float(consistency_and_grads(state.params)[0])) > 1e-6
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(teacher_grad))
  assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(student_grad))


@pytest.mark.parametrize('noise, expect_zero', [
    ({'dropout_rate': 0.0, **NO_PERTURBATION}, True),
    ({'dropout_rate': 0.5, **NO_PERTURBATION}, False),
    ({'dropout_rate': 0.0}, False),
], ids=['identical_views', 'dropout_only', 'perturbation_only'])
def test_pi_consistency_is_zero_exactly_when_the_views_coincide(noise, expect_zero):
  config = baseline_config('pi_model', **noise)
  state = fresh_state(config)
  loss = functools.partial(pi_model.objective, state=state, batch=synthetic_batch(jax.random.key(4)),
                           weight=1.0, config=config)
  consistency = float(jax.jit(loss)(state.params)[1][2])
  if expect_zero:
    assert consistency == 0.0
  else:
    assert consistency > 1e-6


def test_mean_teacher_requires_an_ema_decay():
  config = baseline_config('mean_teacher', ema_decay=0.0)
  assert methods.get('mean_teacher').keeps_ema(config)
  # One check, through the registry: config validation and building the step both refuse it.
  with pytest.raises(validation.ConfigError, match='config.ema.decay=0.0'):
    validation.validate_config(config)
  with pytest.raises(validation.ConfigError, match='ema.decay'):
    methods.make_train_step(config, 10)
