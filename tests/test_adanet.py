"""ADA-Net: the gradient-reversal layer, the cross-set mix-up and the loss against NumPy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from semimeta_jax import errors
from semimeta_jax import methods
from semimeta_jax import models
from semimeta_jax import parallel
from semimeta_jax.methods import adanet
from semimeta_jax.methods import common
from tests import conftest
from tests.conftest import synthetic_batch, tiny_config
from tests.test_baselines import traceable
from tests.test_parallel import one_step


def adanet_config(**overrides):
  return tiny_config(method='adanet', num_train_steps=10, **{'adanet.discriminator_width': 8, **overrides})


def _state(config, seed=0):
  model = models.get_model(config, 10)
  return methods.init_train_state(config, model, (8, 8, 1), jax.random.key(seed), num_classes=10)


@pytest.mark.parametrize('coefficient', [0.0, 0.37, 1.0])
def test_the_reversal_layer_is_the_identity_with_minus_c_times_its_gradient(coefficient):
  x = jax.random.normal(jax.random.key(0), (4, 3))
  w = jax.random.normal(jax.random.key(1), (4, 3))
  downstream = lambda y: jnp.sum(jnp.sin(y) * w)
  c = jnp.float32(coefficient)
  chex.assert_trees_all_equal(adanet.reverse_gradient(x, c), x)
  reversed_grad, coefficient_grad = jax.grad(lambda x, c: downstream(adanet.reverse_gradient(x, c)),
                                             argnums=(0, 1))(x, c)
  chex.assert_trees_all_equal(reversed_grad, -c * jax.grad(downstream)(x))
  assert float(coefficient_grad) == 0.0


def test_the_reversal_coefficient_follows_its_schedule():
  steps = np.array([0, 1, 5, 10])
  got = np.asarray(adanet.reversal_coefficient(jnp.asarray(steps), 10))
  want = 2.0 / (1.0 + np.exp(-10.0 * steps / 10)) - 1.0
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert got[0] == 0.0 and got[-1] > 0.9999


@pytest.mark.slow
def test_the_mixing_weights_are_uniform_draws():
  lam = np.asarray(adanet.mixing_weights(_state(adanet_config()), 20000, 1.0))
  assert lam.min() > 0.0 and lam.max() < 1.0
  # Beta(1, 1) is U(0, 1): each decile holds a tenth of the draws (binomial sd 0.002).
  deciles = np.histogram(lam, bins=10, range=(0.0, 1.0))[0] / lam.size
  np.testing.assert_allclose(deciles, 0.1, atol=0.01)


def numpy_mlp(params, x):
  for name in ('hidden1', 'hidden2'):
    x = np.maximum(x @ np.float64(params[name]['kernel']) + np.float64(params[name]['bias']), 0.0)
  return x @ np.float64(params['logits']['kernel']) + np.float64(params['logits']['bias'])


def log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@pytest.mark.slow
def test_the_mixed_batch_and_the_loss_equal_numpy():
  config = adanet_config()
  state = _state(config)
  batch = synthetic_batch(jax.random.key(2))
  labeled, unlabeled = batch['labeled'], batch['unlabeled']
  lam = np.float32(np.random.default_rng(0).uniform(size=16))
  # The pseudo-labels, in NumPy from an evaluation-mode forward of the unlabeled images.
  pseudo = np.exp(log_softmax(np.float64(jax.jit(common.eval_forward)(state, state.params,
                                                                       unlabeled['image']))))
  l4 = lam[:, None, None, None]
  want_images = l4 * np.asarray(labeled['image']) + (1 - l4) * np.asarray(unlabeled['image'])
  want_targets = lam[:, None] * np.eye(10)[np.asarray(labeled['label'])] + (1 - lam[:, None]) * pseudo
  images, targets = jax.jit(adanet.cross_set_mixup)(labeled['image'], labeled['label'],
                                                    unlabeled['image'], jnp.float32(pseudo), lam)
  np.testing.assert_allclose(images, want_images, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(targets, want_targets, rtol=1e-6, atol=1e-7)

  # The loss: lambda-weighted CE on the mixed logits plus the discriminator's CE to [lambda, 1 - lambda].
  logits, features, _ = jax.jit(common.train_forward_with_features)(
      state, state.params, jnp.float32(want_images), state.batch_stats,
      state.step_key(common.DROPOUT_UNLABELED))
  classification = np.mean(lam * -np.sum(want_targets * log_softmax(np.float64(logits)), axis=1))
  disc_params = state.extra['adanet']['params']
  disc_targets = np.stack([lam, 1 - lam], axis=1)
  alignment = np.mean(-np.sum(disc_targets * log_softmax(numpy_mlp(disc_params, np.float64(features))),
                              axis=1))
  coefficient = adanet.reversal_coefficient(3, 10)
  loss, (_, got_classification, got_alignment, _, _) = jax.jit(
      lambda trainable: adanet.objective(trainable, state, batch, jnp.asarray(lam), coefficient=coefficient,
                                         num_classes=10, config=config))(
          {'classifier': state.params, 'discriminator': disc_params})
  np.testing.assert_allclose(got_classification, classification, rtol=1e-5)
  np.testing.assert_allclose(got_alignment, alignment, rtol=1e-5)
  np.testing.assert_allclose(loss, classification + alignment, rtol=1e-5)


@pytest.mark.slow
def test_the_pseudo_labels_carry_no_gradient(monkeypatch):
  config = adanet_config()
  state = _state(config)
  batch = synthetic_batch(jax.random.key(3))
  lam = jnp.linspace(0.05, 0.95, 16)
  trainable = {'classifier': state.params, 'discriminator': state.extra['adanet']['params']}
  grad = lambda: jax.jit(jax.grad(lambda t: adanet.objective(
      t, state, batch, lam, coefficient=jnp.float32(0.5), num_classes=10, config=config)[0]))(trainable)
  with_pseudo_labels = grad()
  # The same objective with the pseudo-labels computed beforehand and passed in as constants.
  constants = jax.jit(lambda: adanet.pseudo_labels(state, state.params, batch['unlabeled']['image'],
                                                   num_classes=10, hard=False))()
  monkeypatch.setattr(adanet, 'pseudo_labels', lambda *args, **kwargs: constants)
  with_constants = grad()
  # Equal up to rounding (the two programs fuse differently); a leak would be of the gradient's size.
  chex.assert_trees_all_close(with_pseudo_labels, with_constants, rtol=1e-4, atol=1e-7)
  # Not vacuous: the pseudo-labels' own gradient (through the eval forward) is far from zero.
  direct = jax.jit(jax.grad(lambda p: jnp.sum(jax.nn.softmax(common.eval_forward(
      state, p, batch['unlabeled']['image'])) * jnp.arange(10.0))))(state.params)
  assert float(jnp.abs(direct['head']['fc']['kernel']).sum()) > 1e-3


@pytest.mark.slow
def test_a_step_trains_both_networks_and_traces_once():
  config = adanet_config()
  state = _state(config)
  step = jax.jit(chex.assert_max_traces(traceable(methods.make_train_step(config, 10)), n=1))
  history = []
  new_state = state
  for seed in range(3):
    new_state, metrics = step(new_state, synthetic_batch(jax.random.key(seed)))
    history.append(jax.tree.map(float, metrics))
  assert history[0]['reversal_coefficient'] == 0.0 < history[1]['reversal_coefficient']
  assert all(np.isfinite(row['loss']) and row['alignment_loss'] > 0 for row in history)
  assert history[0]['discriminator_grad_norm'] > 0
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new_state.extra['adanet']['params'],
                         state.extra['adanet']['params'])
  assert all(jax.tree.leaves(changed))
  assert not np.allclose(new_state.params['head']['fc']['kernel'], state.params['head']['fc']['kernel'])


@pytest.mark.slow
def test_eight_devices_equal_one():
  config = adanet_config()
  batch = jax.tree.map(np.asarray, synthetic_batch(jax.random.key(1)))
  state8, metrics8 = one_step(config, parallel.make_mesh(conftest.cpu_devices(8)), batch)
  state1, metrics1 = one_step(config, parallel.make_mesh(conftest.cpu_devices(1)), batch)
  chex.assert_trees_all_close(state8.extra, state1.extra, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state8.params, state1.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(metrics8, metrics1, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('overrides,field', [
    ({'unlabeled_batch_size': 32}, 'unlabeled_batch_size'),
    ({'adanet.discriminator_width': 0}, 'adanet.discriminator_width'),
    ({'adanet.mixup_alpha': 0.0}, 'adanet.mixup_alpha'),
    ({'adanet.alignment_weight': -1.0}, 'adanet.alignment_weight'),
])
def test_bad_fields_are_refused(overrides, field):
  with pytest.raises(errors.ConfigError, match=field.replace('.', r'\.')):
    methods.configure(adanet_config(**overrides))


@pytest.mark.parametrize('dataset,name', [('digits', 'adanet'), ('digits', 'adanet_fast_swa'),
                                          ('cifar10', 'adanet'), ('cifar10', 'adanet_fast_swa')])
def test_the_presets_pass_the_checks(dataset, name):
  from configs import cifar10, digits  # pylint: disable=g-import-not-at-top
  config = {'digits': digits, 'cifar10': cifar10}[dataset].get_config(name)
  configured = methods.configure(config)
  assert configured.method.name == 'adanet'
  assert ('fast_swa' in [o.name for o in configured.options]) == name.endswith('fast_swa')


def test_the_imagenet_preset_is_the_authors_schedule():
  from configs import imagenet  # pylint: disable=g-import-not-at-top
  config = methods.apply_preset(imagenet.get_config(), 'imagenet', 'adanet')
  methods.configure(config)
  assert config.model == 'resnet18' and config.data.label_fraction == 0.1
  # 60 epochs of 1.28M / 256 images; lr / 10 after epochs 30, 45 and 55.
  assert config.num_train_steps == 60 * 5000
  assert tuple(config.lr_decay_boundaries) == (30 * 5000, 45 * 5000, 55 * 5000)


@pytest.mark.slow
def test_the_features_receive_minus_c_times_the_weighted_alignment_gradient():
  # No dropout, and a weight and a coefficient other than 1, so that each factor shows.
  config = adanet_config(dropout_rate=0.0, **{'adanet.alignment_weight': 0.6})
  state = _state(config)
  batch = synthetic_batch(jax.random.key(4))
  lam = jnp.linspace(0.1, 0.9, 16)
  trainable = {'classifier': state.params, 'discriminator': state.extra['adanet']['params']}
  grads = jax.jit(jax.grad(lambda t: adanet.objective(
      t, state, batch, lam, coefficient=jnp.float32(0.37), num_classes=10, config=config)[0]))(trainable)

  # The two losses rebuilt without the reversal layer, each differentiated on its own.
  targets, _ = adanet.pseudo_labels(state, state.params, batch['unlabeled']['image'], num_classes=10,
                                    hard=False)
  images, mixed_targets = adanet.cross_set_mixup(batch['labeled']['image'], batch['labeled']['label'],
                                                 batch['unlabeled']['image'], targets, lam)
  discriminator = adanet.Discriminator(8)

  def losses(params, disc_params):
    logits, features, _ = common.train_forward_with_features(state, params, images, state.batch_stats,
                                                             jax.random.key(0))
    classification = jnp.mean(lam * -jnp.sum(mixed_targets * jax.nn.log_softmax(logits), axis=-1))
    disc_log_probs = jax.nn.log_softmax(discriminator.apply({'params': disc_params}, features))
    alignment = jnp.mean(-jnp.sum(jnp.stack([lam, 1 - lam], -1) * disc_log_probs, axis=-1))
    return classification, alignment

  classification_grad = jax.jit(jax.grad(lambda p: losses(p, trainable['discriminator'])[0]))(state.params)
  alignment_grad = jax.jit(jax.grad(lambda p: losses(p, trainable['discriminator'])[1]))(state.params)
  disc_grad = jax.jit(jax.grad(lambda d: losses(state.params, d)[1]))(trainable['discriminator'])
  want = jax.tree.map(lambda g, a: g - 0.37 * 0.6 * a, classification_grad, alignment_grad)
  chex.assert_trees_all_close(grads['classifier'], want, rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(grads['discriminator'], jax.tree.map(lambda a: 0.6 * a, disc_grad),
                              rtol=1e-4, atol=1e-7)
  # Not vacuous: the reversed alignment term moves the classifier's gradient well beyond the tolerance.
  assert float(optax.tree.norm(alignment_grad)) > 1e-2
