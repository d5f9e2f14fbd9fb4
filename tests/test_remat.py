"""`config.remat='batch_norm'`: the same model, values and gradients; less kept for the backward."""

import collections

import chex
import jax
from jax._src import ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from semimeta_jax import errors
from semimeta_jax import methods
from semimeta_jax import models
from semimeta_jax import run_dir
from semimeta_jax import validation

# (model, width, input shape): tiny instances, one per architecture family.
TINY = {
    'convlarge': (4, (4, 16, 16, 3)),
    'resnet18': (4, (4, 32, 32, 3)),
    'wrn28_2': (4, (4, 8, 8, 3)),
}


def _model(name, remat, half_precision=False):
  config = default.get_config()
  config.model = name
  config.model_width = TINY[name][0]
  config.remat = remat
  config.half_precision = half_precision
  return models.get_model(config, 10)


def _variables_and_images(name):
  x = jax.random.normal(jax.random.key(3), TINY[name][1])
  keys = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
  return _model(name, 'none').init(keys, x, train=False), x


def _loss_and_grads(model, variables, x):
  """A training forward's loss, its parameter gradient and the updated batch statistics."""

  def loss(params):
    logits, updates = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                                  train=True, rngs={'dropout': jax.random.key(2)},
                                  mutable=['batch_stats'])
    return jnp.sum(logits * jnp.arange(10.0)), updates['batch_stats']

  (value, stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
  return value, grads, stats


def _residual_bytes_by_producer(model, variables, x):
  """Bytes of the activations a training forward keeps for its backward, by producing primitive."""

  def loss(params):
    logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                            train=True, rngs={'dropout': jax.random.key(2)}, mutable=['batch_stats'])
    return jnp.sum(logits)

  kept = collections.Counter()
  for aval, source in ad_checkpoint.saved_residuals(loss, variables['params']):
    if source.startswith('output of '):
      kept[source.split(' from ')[0].removeprefix('output of ')] += aval.size * aval.dtype.itemsize
  return kept


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(TINY))
def test_same_variables_values_and_gradients(name):
  variables, x = _variables_and_images(name)
  remat_model = _model(name, 'batch_norm')
  # The same layer names: a checkpoint written without remat restores with it, and back.
  chex.assert_trees_all_equal_shapes_and_dtypes(
      remat_model.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)}, x, train=False),
      variables)
  plain = _loss_and_grads(_model(name, 'none'), variables, x)
  rematted = _loss_and_grads(remat_model, variables, x)
  # Float32 rounding only: the recomputed normalisation may fuse and round differently.
  chex.assert_trees_all_close(rematted, plain, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(remat_model.apply(variables, x, train=False),
                                _model(name, 'none').apply(variables, x, train=False))


@pytest.mark.parametrize('half_precision', [False, True])
def test_batch_norm_keeps_only_its_input(half_precision):
  variables, x = _variables_and_images('convlarge')
  plain = _residual_bytes_by_producer(_model('convlarge', 'none', half_precision), variables, x)
  rematted = _residual_bytes_by_producer(_model('convlarge', 'batch_norm', half_precision), variables, x)
  # Without remat batch norm keeps its centred input (`sub`) and normalised value (`mul`), in
  # float32 even under bfloat16 activations; with it, only its input: the convolution's output.
  activation_bytes = x.shape[0] * 16 * 16 * 4 * (2 if half_precision else 4)
  assert plain['sub'] >= 3 * x.shape[0] * 16 * 16 * 4 * 4  # The three 16x16 layers, float32.
  assert plain['mul'] >= plain['sub']
  assert rematted['sub'] == rematted['mul'] == 0
  assert rematted['conv_general_dilated'] >= 3 * activation_bytes
  assert sum(rematted.values()) < sum(plain.values()) - plain['sub']


@pytest.mark.slow
def test_train_step_is_unchanged():
  config = default.get_config()
  config.model, config.model_width = 'convlarge', 4
  config.labeled_batch_size = config.unlabeled_batch_size = 4
  config.hypergrad.mode = 'exact'
  config.warmup_steps = 0
  images = jax.random.normal(jax.random.key(5), (8, 16, 16, 3))
  batch = {'labeled': {'image': images[:4], 'label': jnp.arange(4) % 10, 'index': jnp.arange(4)},
           'unlabeled': {'image': images[4:], 'label': jnp.arange(4) % 10, 'index': 4 + jnp.arange(4)}}
  results = []
  for remat in models.REMAT_POLICIES:
    config.remat = remat
    model = models.get_model(config, 10)
    state = methods.init_train_state(config, model, (16, 16, 3), jax.random.key(0), num_train=8,
                                     num_classes=10)
    results.append(jax.jit(methods.make_train_step(config, 10))(state, batch))
  (plain_state, plain_metrics), (remat_state, remat_metrics) = results
  chex.assert_trees_all_close((remat_state.params, remat_state.batch_stats, remat_metrics),
                              (plain_state.params, plain_state.batch_stats, plain_metrics),
                              rtol=1e-5, atol=1e-6)


def test_unknown_policy_is_a_config_error():
  config = default.get_config()
  config.remat = 'everything'
  with pytest.raises(errors.ConfigError, match='remat'):
    validation.validate_config(config)


def test_policy_may_change_when_a_run_resumes():
  # It changes no value, so a run that ran out of memory resumes with it (or a run from before
  # the field existed resumes without it) with no --config.allow_config_change.
  saved = {'remat': 'none', 'learning_rate': 0.1}
  assert run_dir.config_differences(saved, {**saved, 'remat': 'batch_norm'}) == {}
  assert run_dir.config_differences({'learning_rate': 0.1}, {**saved, 'remat': 'batch_norm'}) == {}
  assert run_dir.config_differences(saved, {**saved, 'learning_rate': 0.2}) != {}
