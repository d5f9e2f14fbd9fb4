"""SNTG: the graph loss against a loop over the pairs, and its term in each consistency method."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semimeta_jax import methods
from semimeta_jax import models
from semimeta_jax import validation
from semimeta_jax.methods import augment
from semimeta_jax.methods import common
from semimeta_jax.methods import ema
from semimeta_jax.methods import mean_teacher
from semimeta_jax.methods import sntg
from tests.conftest import synthetic_batch, tiny_config


def loop_loss(features, labels, margin):
  """SNTG's loss written out pair by pair in float64."""
  features = np.asarray(features, np.float64)
  half = len(features) // 2
  total = 0.0
  for i in range(half):
    distance2 = np.mean((features[i] - features[i + half]) ** 2)
    if labels[i] == labels[i + half]:
      total += distance2
    else:
      total += max(0.0, margin - np.sqrt(distance2)) ** 2
  return total / half


def spread_features(key, batch, dim, scale=0.6):
  return scale * jax.random.normal(key, (batch, dim), jnp.float64)


@pytest.mark.parametrize('batch', [10, 11], ids=['even', 'odd'])
def test_graph_loss_equals_a_loop_over_the_pairs(batch):
  with jax.enable_x64(True):
    features = spread_features(jax.random.key(0), batch, 6)
    labels = np.array([0, 1, 2, 0, 1, 0, 2, 2, 1, 0, 1])[:batch]
    half = batch // 2
    same = labels[:half] == labels[half:2 * half]
    distances = np.sqrt(np.mean((np.asarray(features[:half]) - np.asarray(features[half:2 * half])) ** 2, -1))
    # Every branch is exercised: neighbours, and non-neighbours inside and beyond the margin.
    assert same.any() and (~same & (distances < 1.0)).any() and (~same & (distances > 1.0)).any()
    got = jax.jit(sntg.graph_loss, static_argnums=2)(features, jnp.asarray(labels), 1.0)
    np.testing.assert_allclose(float(got), loop_loss(features, labels, 1.0), rtol=1e-12)


def test_the_gradient_reaches_both_halves_as_the_loop_says():
  with jax.enable_x64(True):
    features = spread_features(jax.random.key(1), 8, 5)
    labels = np.array([0, 1, 2, 1, 0, 1, 0, 2])
    grad = np.asarray(jax.grad(sntg.graph_loss)(features, jnp.asarray(labels), 1.0))
    # Central differences of the loop, coordinate by coordinate.
    numeric = np.zeros_like(grad)
    base = np.asarray(features)
    for index in np.ndindex(base.shape):
      step = np.zeros_like(base)
      step[index] = 1e-6
      numeric[index] = (loop_loss(base + step, labels, 1.0) - loop_loss(base - step, labels, 1.0)) / 2e-6
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)
    # Each pair pulls (or pushes) both its members, equally and oppositely: no side is held fixed.
    np.testing.assert_allclose(grad[4:], -grad[:4], rtol=1e-12)
    assert (np.abs(grad[4:]).sum(-1) > 0).sum() >= 3


def test_identical_features_of_non_neighbours_have_a_finite_gradient():
  features = jnp.ones((4, 3))
  grad = jax.grad(sntg.graph_loss)(features, jnp.array([0, 1, 1, 0]), 1.0)
  assert np.all(np.isfinite(np.asarray(grad)))


def keyed_state(seed):
  """The one thing `regularize` reads of a TrainState: the step's keys."""
  base = jax.random.key(seed)

  def step_key(*tags):
    key = base
    for tag in tags:
      key = jax.random.fold_in(key, tag)
    return key

  return types.SimpleNamespace(step_key=step_key)


def test_the_labels_are_constants_of_the_teacher_target():
  config = tiny_config(method='mean_teacher', **{'sntg.weight': 0.4})
  features = 0.3 * jax.random.normal(jax.random.key(2), (8, 4))
  target = jax.random.normal(jax.random.key(3), (8, 10))
  labels = jnp.array([3, 7])

  def loss(target_logits):
    return sntg.regularize(0.0, config, keyed_state(0), 1.0, features, target_logits, labels)[0]

  assert float(loss(target)) > 0
  assert np.all(np.asarray(jax.grad(loss)(target)) == 0)
  expected = np.argmax(np.asarray(target), -1)
  expected[:2] = [3, 7]
  np.testing.assert_array_equal(sntg.hard_labels(target, labels), expected)


def test_the_term_is_the_weight_times_the_hosts_consistency_weight_times_the_loop_loss():
  config = tiny_config(method='pi_model', **{'sntg.weight': 0.4, 'sntg.margin': 0.8})
  with jax.enable_x64(True):
    features = spread_features(jax.random.key(6), 10, 5)
    target = jax.random.normal(jax.random.key(7), (10, 10))
    labels = jnp.array([1, 4, 4])
    state = keyed_state(3)
    loss, (aux,) = sntg.regularize(1.5, config, state, 7.25, features, target, labels)
    order = np.asarray(sntg.pair_order(state, 10))
    hard = np.argmax(np.asarray(target), -1)
    hard[:3] = [1, 4, 4]
    expected = loop_loss(np.asarray(features)[order], hard[order], 0.8)
    np.testing.assert_allclose(float(aux['sntg_loss']), expected, rtol=1e-10)
    np.testing.assert_allclose(float(aux['sntg_weight']), 0.4 * 7.25, rtol=1e-12)
    np.testing.assert_allclose(float(loss), 1.5 + 0.4 * 7.25 * expected, rtol=1e-10)


def test_the_pairs_are_two_rows_of_the_batch_drawn_without_replacement():
  # [labeled; unlabeled] rows as the hosts join them: 4 labeled of 12. Over many steps' keys the
  # pairs (order[i], order[i + 6]) are labeled-labeled, mixed and unlabeled-unlabeled in the
  # proportions of two rows drawn without replacement, not all mixed as rows (i, i + 6) would be.
  num_labeled, batch = 4, 12
  counts = np.zeros(3)
  for seed in range(400):
    order = np.asarray(sntg.pair_order(keyed_state(seed), batch))
    assert sorted(order.tolist()) == list(range(batch))  # A permutation: every row once.
    labeled = order < num_labeled
    counts += np.bincount(labeled[:batch // 2].astype(int) + labeled[batch // 2:].astype(int), minlength=3)
  pairs = batch * (batch - 1)
  num_unlabeled = batch - num_labeled
  expected = np.array([num_unlabeled * (num_unlabeled - 1), 2 * num_labeled * num_unlabeled,
                       num_labeled * (num_labeled - 1)]) / pairs
  observed = counts / counts.sum()
  # 2400 pairs: the binomial standard error of each share is below 0.011.
  np.testing.assert_allclose(observed, expected, atol=0.04)
  assert observed[2] > 0.05 and observed[0] > 0.3


# Each method's SNTG features and teacher target, rebuilt here from the step's keys.
def _mean_teacher_parts(state, batch, config):
  images = jnp.concatenate([batch['labeled']['image'], batch['unlabeled']['image']])
  view = lambda v: augment.from_config(config)(state.step_key(common.NOISE, v), images)
  _, features, _ = common.train_forward_with_features(
      state, state.params, view(mean_teacher.STUDENT_VIEW), state.batch_stats,
      state.step_key(common.DROPOUT_UNLABELED))
  teacher_params, teacher_stats = ema.weights(state)
  target, _ = common.train_forward(state, teacher_params, view(mean_teacher.TEACHER_VIEW), teacher_stats,
                                   state.step_key(common.DROPOUT_TEACHER))
  return features, target


def _vat_parts(state, batch, config):
  del config
  logits_l, features_l, stats = common.train_forward_with_features(
      state, state.params, batch['labeled']['image'], state.batch_stats,
      state.step_key(common.DROPOUT_LABELED))
  clean, features_u, _ = common.train_forward_with_features(
      state, state.params, batch['unlabeled']['image'], stats, state.step_key(common.DROPOUT_UNLABELED))
  return jnp.concatenate([features_l, features_u]), jnp.concatenate([logits_l, clean])


def _pi_parts(state, batch, config):
  images = jnp.concatenate([batch['labeled']['image'], batch['unlabeled']['image']])
  view = lambda v: augment.from_config(config)(state.step_key(common.NOISE, v), images)
  _, features, stats = common.train_forward_with_features(
      state, state.params, view(0), state.batch_stats, state.step_key(common.DROPOUT_UNLABELED, 0))
  target, _ = common.train_forward(state, state.params, view(1), stats,
                                   state.step_key(common.DROPOUT_UNLABELED, 1))
  return features, target


def _te_parts(state, batch, config):
  # Every example of the batch has an ensemble after the first step, so the target is Z~.
  images = jnp.concatenate([batch['labeled']['image'], batch['unlabeled']['image']])
  indices = jnp.concatenate([batch['labeled']['index'], batch['unlabeled']['index']])
  view = augment.from_config(config)(state.step_key(common.NOISE), images)
  _, features, _ = common.train_forward_with_features(
      state, state.params, view, state.batch_stats, state.step_key(common.DROPOUT_UNLABELED))
  correction = 1.0 - 0.6 ** state.extra['visits'][indices].astype(jnp.float32)
  return features, state.extra['ensemble'][indices] / correction[:, None], state.extra['visits'][indices]


PARTS = {'mean_teacher': _mean_teacher_parts, 'vat': _vat_parts, 'pi_model': _pi_parts,
         'temporal_ensembling': _te_parts}
METHOD_FIELDS = {'mean_teacher': {'ema.decay': 0.9}, 'vat': {'vat.xi': 0.0, 'vat.entropy_weight': 1.0},
                 'pi_model': {}, 'temporal_ensembling': {'temporal_ensembling.momentum': 0.6}}


@pytest.mark.slow
@pytest.mark.parametrize('method', list(PARTS))
def test_the_step_adds_the_ramped_weight_times_the_loop_loss(method):
  # w_max = 10: the term is 0.4 * w(t) = 0.4 * 10 * ramp(t), the host's whole consistency weight.
  fields = {'consistency_rampup': 'linear', 'consistency_rampup_steps': 2, 'consistency_weight': 10.0,
            **METHOD_FIELDS[method]}
  with_sntg = tiny_config(method=method, **fields, **{'sntg.weight': 0.4, 'sntg.margin': 0.5})
  without = tiny_config(method=method, **fields)
  model = models.get_model(with_sntg, 10)
  batch = synthetic_batch(jax.random.key(4))
  state = methods.init_train_state(with_sntg, model, (8, 8, 1), jax.random.key(0), num_train=32,
                                   num_classes=10)
  step = jax.jit(methods.make_train_step(with_sntg, 10))
  state, first = step(state, batch)  # Step 1: the linear ramp is at 1 / 2.
  assert float(first['sntg_weight']) == 0.0
  _, metrics = step(state, batch)
  _, plain = jax.jit(methods.make_train_step(without, 10))(state, batch)
  assert 'sntg_loss' not in plain

  features, target, *visits = jax.jit(lambda s, b: PARTS[method](s, b, with_sntg))(state, batch)
  assert all(np.all(np.asarray(v) > 0) for v in visits)  # Temporal Ensembling: every target exists.
  labels = np.argmax(np.asarray(target), -1)
  labels[:len(batch['labeled']['label'])] = batch['labeled']['label']
  order = np.asarray(sntg.pair_order(state, len(labels)))
  expected = loop_loss(np.asarray(features)[order], labels[order], 0.5)
  assert expected > 0.01
  # Step 1 of a linear ramp over 2: w(t) = 10 / 2, the graph term's weight 0.4 * 5.
  np.testing.assert_allclose(float(metrics['consistency_weight']), 5.0, rtol=1e-6)
  np.testing.assert_allclose(float(metrics['sntg_weight']), 2.0, rtol=1e-6)
  np.testing.assert_allclose(float(metrics['sntg_loss']), expected, rtol=1e-4)
  np.testing.assert_allclose(float(metrics['loss']), float(plain['loss']) + 2.0 * expected, rtol=1e-5)
  for name in ('supervised_loss', 'consistency_loss'):
    np.testing.assert_allclose(float(metrics[name]), float(plain[name]), rtol=1e-6)


@pytest.mark.slow
def test_sntg_leaves_the_methods_without_it_unchanged():
  config = tiny_config(method='mean_teacher', **{'ema.decay': 0.9})
  assert config.sntg.weight == 0.0  # Off by default.
  batch = synthetic_batch(jax.random.key(5))
  state = methods.init_train_state(config, models.get_model(config, 10), (8, 8, 1), jax.random.key(0),
                                   num_train=32, num_classes=10)
  _, metrics = jax.jit(methods.make_train_step(config, 10))(state, batch)
  assert not any(name.startswith('sntg') for name in metrics)


@pytest.mark.parametrize('method', ['semimeta', 'supervised', 'pseudo_label'])
def test_sntg_on_a_method_without_a_teacher_is_one_clear_error(method):
  config = tiny_config(method=method, **{'sntg.weight': 0.4})
  with pytest.raises(validation.ConfigError, match=r'config\.sntg\.weight=0\.4: .*mean_teacher') as error:
    validation.validate_config(config)
  assert 'pi_model' in str(error.value) and 'vat' in str(error.value)


@pytest.mark.parametrize('field,value', [('sntg.weight', -0.1), ('sntg.margin', 0.0)])
def test_a_bad_sntg_field_is_named(field, value):
  with pytest.raises(validation.ConfigError, match=f'config.{field}='):
    validation.validate_config(tiny_config(method='pi_model', **{field: value}))


@pytest.mark.parametrize('dataset', ['digits', 'cifar10'])
def test_the_sntg_presets_are_their_methods_presets_plus_the_papers_weight(dataset):
  presets = methods.presets(dataset)
  for name, base_name in [('pi_sntg', 'pi_model'), ('te_sntg', 'temporal_ensembling'),
                          ('mt_sntg', 'mean_teacher'), ('vat_ent_sntg', 'vat_ent')]:
    assert presets[name] == {**presets[base_name], 'sntg.weight': 0.4}
