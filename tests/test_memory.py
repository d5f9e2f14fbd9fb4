"""MA-DNN: the class memory's update, its prediction and loss against NumPy, on 1 and 8 devices."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semimeta_jax import errors
from semimeta_jax import methods
from semimeta_jax import models
from semimeta_jax import parallel
from semimeta_jax.methods import common
from semimeta_jax.methods import memory
from tests import conftest
from tests.conftest import synthetic_batch, tiny_config
from tests.test_baselines import traceable
from tests.test_parallel import one_step

NUM_CLASSES, FEATURE_DIM = 5, 6


def numpy_update(keys, values, features, predictions, labels, rate):
  """The authors' gather-then-scatter_sub, one example at a time, in float64."""
  keys, values = np.array(keys, np.float64), np.array(values, np.float64)
  old_keys, old_values = keys.copy(), values.copy()
  for i, label in enumerate(labels):
    count = np.sum(labels == label)
    keys[label] -= rate / (1 + count) * (old_keys[label] - features[i])
    values[label] -= rate / (1 + count) * (old_values[label] - predictions[i])
  return keys, values / values.sum(axis=1, keepdims=True)


def numpy_memory_loss(keys, values, labels, unlabeled_features, network_probs):
  """p_mem for the joined batch and the loss of the authors' code, in float64."""
  rows = [values[label] for label in labels]
  for feature in unlabeled_features:
    distance = np.sqrt((feature[None, :] - keys) ** 2 + 1e-10).sum(axis=1)
    membership = np.exp(-distance - np.max(-distance))
    membership = np.clip(membership / membership.sum(), 1e-10, 1.0)
    read = membership @ values
    rows.append(read / read.sum())
  memory_probs = np.stack(rows)
  entropy = -np.sum(memory_probs * np.log(memory_probs + 1e-8), axis=1)
  divergence = np.sum(network_probs * np.log(network_probs / memory_probs + 1e-8), axis=1)
  return memory_probs, np.mean(entropy + memory_probs.max(axis=1) * divergence)


def random_memory(rng):
  values = rng.uniform(0.1, 1.0, (NUM_CLASSES, NUM_CLASSES))
  return {'keys': rng.normal(size=(NUM_CLASSES, FEATURE_DIM)),
          'values': values / values.sum(axis=1, keepdims=True)}


def softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def test_the_update_equals_a_loop_over_the_batch():
  rng = np.random.default_rng(0)
  start = random_memory(rng)
  # Class 0 three times, class 2 once, classes 1, 3 and 4 absent.
  labels = np.array([0, 2, 0, 0])
  features = rng.normal(size=(4, FEATURE_DIM))
  predictions = softmax(rng.normal(size=(4, NUM_CLASSES)))
  update = jax.jit(functools.partial(memory.update_memory, update_rate=0.5))
  got = update(jax.tree.map(jnp.float32, start), jnp.float32(features), jnp.float32(predictions),
               jnp.asarray(labels))
  want_keys, want_values = numpy_update(start['keys'], start['values'], features, predictions, labels, 0.5)
  np.testing.assert_allclose(got['keys'], want_keys, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got['values'], want_values, rtol=1e-5, atol=1e-6)
  # A class not in the batch keeps its memory bit for bit.
  np.testing.assert_array_equal(np.asarray(got['keys'])[[1, 3, 4]], np.float32(start['keys'][[1, 3, 4]]))
  # The result does not depend on the order of the batch.
  order = np.array([3, 1, 0, 2])
  shuffled = update(jax.tree.map(jnp.float32, start), jnp.float32(features[order]),
                    jnp.float32(predictions[order]), jnp.asarray(labels[order]))
  chex.assert_trees_all_close(shuffled, got, rtol=1e-6, atol=1e-7)


def test_the_prediction_and_loss_equal_numpy():
  rng = np.random.default_rng(1)
  mem = random_memory(rng)
  labels = np.array([1, 4, 1])
  unlabeled_features = mem['keys'][[2, 0]] + 0.3 * rng.normal(size=(2, FEATURE_DIM))
  network_probs = softmax(rng.normal(size=(5, NUM_CLASSES)))
  want_probs, want_loss = numpy_memory_loss(mem['keys'], mem['values'], labels, unlabeled_features,
                                            network_probs)
  mem32 = jax.tree.map(jnp.float32, mem)
  probs = jax.jit(memory.memory_prediction)(mem32, jnp.asarray(labels), jnp.float32(unlabeled_features))
  loss, _, _ = jax.jit(memory.memory_loss)(probs, jnp.float32(network_probs))
  np.testing.assert_allclose(probs, want_probs, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  # Near a key, the unlabeled example reads mostly that class's value.
  assert np.argmax(want_probs[3]) == np.argmax(mem['values'][2])


@pytest.mark.slow
def test_the_unlabeled_features_receive_the_memory_loss_gradient():
  rng = np.random.default_rng(2)
  mem = jax.tree.map(jnp.float32, random_memory(rng))
  features = jnp.float32(rng.normal(size=(3, FEATURE_DIM)))
  network_probs = jnp.float32(softmax(rng.normal(size=(4, NUM_CLASSES))))

  def loss(features, mem):
    probs = memory.memory_prediction(mem, jnp.array([0]), features)
    return memory.memory_loss(probs, network_probs)[0]

  feature_grad = jax.grad(loss)(features, mem)
  assert np.all(np.abs(np.asarray(feature_grad)).sum(axis=1) > 0)
  # Central difference of one coordinate, in float64.
  with jax.enable_x64(True):
    f64, m64, p64 = np.float64(features), jax.tree.map(np.float64, mem), np.float64(network_probs)
    h = 1e-6
    shift = np.zeros_like(f64)
    shift[1, 2] = h

    def loss64(f):
      probs = memory.memory_prediction(m64, jnp.array([0]), jnp.asarray(f))
      return float(memory.memory_loss(probs, jnp.asarray(p64))[0])

    numeric = (loss64(f64 + shift) - loss64(f64 - shift)) / (2 * h)
  np.testing.assert_allclose(feature_grad[1, 2], numeric, rtol=1e-3, atol=1e-6)


def _state(config, seed=0):
  model = models.get_model(config, 10)
  return methods.init_train_state(config, model, (8, 8, 1), jax.random.key(seed), num_classes=10)


def test_a_step_updates_the_memory_first_and_trains_on_the_numpy_loss():
  config = tiny_config(method='ma_dnn')
  state = _state(config)
  assert state.extra['ma_dnn']['keys'].shape == (10, state.params['head']['fc']['kernel'].shape[0])
  chex.assert_trees_all_equal(state.extra['ma_dnn']['values'], jnp.full((10, 10), 0.1, jnp.float32))
  batch = synthetic_batch(jax.random.key(3))
  images = jnp.concatenate([batch['labeled']['image'], batch['unlabeled']['image']])
  logits, features, _ = jax.jit(common.train_forward_with_features)(
      state, state.params, images, state.batch_stats, state.step_key(common.DROPOUT_UNLABELED))
  logits, features = np.float64(logits), np.float64(features)
  labels = np.asarray(batch['labeled']['label'])
  probs = softmax(logits)
  keys, values = numpy_update(state.extra['ma_dnn']['keys'], state.extra['ma_dnn']['values'],
                              features[:16], probs[:16], labels, 0.5)
  _, want_memory_loss = numpy_memory_loss(keys, values, labels, features[16:], probs)
  log_probs = logits[:16] - np.log(np.exp(logits[:16]).sum(axis=1, keepdims=True))
  want_supervised = -np.mean(log_probs[np.arange(16), labels])

  step = jax.jit(chex.assert_max_traces(traceable(methods.make_train_step(config, 10)), n=1))
  new_state, metrics = step(state, batch)
  np.testing.assert_allclose(new_state.extra['ma_dnn']['keys'], keys, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new_state.extra['ma_dnn']['values'], values, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics['memory_loss'], want_memory_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics['supervised_loss'], want_supervised, rtol=1e-5)
  np.testing.assert_allclose(metrics['loss'], want_supervised + want_memory_loss, rtol=1e-5)
  # Further steps reuse the one compiled step and keep moving the memory.
  later, _ = step(new_state, batch)
  later, _ = step(later, synthetic_batch(jax.random.key(4)))
  assert not np.allclose(later.extra['ma_dnn']['keys'], new_state.extra['ma_dnn']['keys'])


@pytest.mark.slow
def test_eight_devices_equal_one():
  config = tiny_config(method='ma_dnn')
  batch = jax.tree.map(np.asarray, synthetic_batch(jax.random.key(1)))
  state8, metrics8 = one_step(config, parallel.make_mesh(conftest.cpu_devices(8)), batch)
  state1, metrics1 = one_step(config, parallel.make_mesh(conftest.cpu_devices(1)), batch)
  chex.assert_trees_all_close(state8.extra, state1.extra, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state8.params, state1.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(metrics8, metrics1, rtol=1e-4, atol=1e-6)
  assert not np.allclose(state1.extra['ma_dnn']['keys'], 0.0)  # Two updates moved it.


@pytest.mark.parametrize('field,value', [('ma_dnn.update_rate', 0.0), ('ma_dnn.update_rate', 1.5),
                                         ('ma_dnn.weight', -1.0)])
def test_bad_fields_are_refused(field, value):
  with pytest.raises(errors.ConfigError, match=field.replace('.', r'\.')):
    methods.configure(tiny_config(method='ma_dnn', **{field: value}))


def test_the_presets_name_the_method_and_pass_the_checks():
  for dataset in ('digits', 'cifar10'):
    preset = methods.presets(dataset)['ma_dnn']
    assert preset['method'] == 'ma_dnn'
    config = methods.apply_preset(tiny_config(), dataset, 'ma_dnn')
    methods.configure(config)
    assert config.ema.headline and config.ma_dnn.update_rate == 0.5


@pytest.mark.slow
def test_the_weighted_memory_loss_trains_the_unlabeled_features_and_not_the_memory_update():
  # A weight other than 1 and a memory away from its start, so that each factor shows.
  config = tiny_config(method='ma_dnn', dropout_rate=0.0, **{'ma_dnn.weight': 0.4})
  state = _state(config)
  batch = synthetic_batch(jax.random.key(5))
  labels = batch['labeled']['label']
  images = jnp.concatenate([batch['labeled']['image'], batch['unlabeled']['image']])
  logits, features, _ = jax.jit(common.train_forward_with_features)(state, state.params, images,
                                                                   state.batch_stats, jax.random.key(0))
  # Keys near ten of the unlabeled features: the memberships are soft, the features' gradient large.
  rng = np.random.default_rng(3)
  values = rng.uniform(0.1, 1.0, (10, 10))
  start = {'keys': features[16:26] + jnp.float32(0.05 * rng.normal(size=(10, features.shape[1]))),
           'values': jnp.float32(values / values.sum(axis=1, keepdims=True))}
  state = state.replace(extra={'ma_dnn': start})
  (loss, _), grads = jax.jit(jax.value_and_grad(
      lambda p: memory.objective(p, state, batch, config=config), has_aux=True))(state.params)

  # The loss as a function of the network: the memory moved by this batch is a constant (the
  # authors' scatter update is not differentiated); p_mem of U follows the features through the keys.
  updated = jax.jit(functools.partial(memory.update_memory, update_rate=0.5))(
      start, features[:16], jax.nn.softmax(logits[:16]), labels)

  def rebuilt(params, feature_path=True):
    logits, features, _ = common.train_forward_with_features(state, params, images, state.batch_stats,
                                                             jax.random.key(0))
    probs = jax.nn.softmax(logits)
    supervised = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:16]), labels[:, None], axis=1))
    unlabeled = features[16:] if feature_path else jax.lax.stop_gradient(features[16:])
    memory_probs = memory.memory_prediction(updated, labels, unlabeled)
    return supervised + 0.4 * memory.memory_loss(memory_probs, probs)[0]

  want_loss, want_grads = jax.jit(jax.value_and_grad(rebuilt))(state.params)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  chex.assert_trees_all_close(grads, want_grads, rtol=1e-4, atol=1e-7)
  # Not vacuous: without the path through the unlabeled features the gradient is another one.
  without = jax.jit(jax.grad(functools.partial(rebuilt, feature_path=False)))(state.params)
  gap = max(float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(without), jax.tree.leaves(want_grads)))
  assert gap > 1e-4, gap
