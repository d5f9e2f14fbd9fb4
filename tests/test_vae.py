"""The VAE TNAR loads: its ELBO against NumPy, its training, its shapes, its saved description."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from semimeta_jax import errors
from semimeta_jax import vae_main
from semimeta_jax.models import vae as vae_lib
from tests.conftest import tiny_config

IMAGE_SHAPE = (2, 2, 1)
FIELDS = {'architecture': 'mlp', 'latent_dim': 2, 'width': 3}


def _leaky(x):
  return np.where(x > 0, x, 0.1 * x)


def _dense(x, layer):
  return x @ np.asarray(layer['kernel'], np.float64) + np.asarray(layer['bias'], np.float64)


def numpy_negative_elbo(params, x, noise, sigma):
  """-ELBO of the MLP VAE written out in float64 NumPy: Gaussian likelihood, KL to N(0, I)."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  hidden = _leaky(_dense(x, params['enc_hidden']))
  mu, logvar = _dense(hidden, params['to_mu']), _dense(hidden, params['to_logvar'])
  z = mu + np.exp(0.5 * logvar) * np.asarray(noise, np.float64)
  recon = _dense(_leaky(_dense(z, params['dec_hidden'])), params['dec_out'])
  log_likelihood = np.sum(-0.5 * ((x - recon) / sigma) ** 2 - np.log(sigma) - 0.5 * np.log(2 * np.pi), 1)
  kl = np.sum(0.5 * (mu ** 2 + np.exp(logvar) - 1 - logvar), 1)
  return np.mean(kl - log_likelihood), np.mean(-log_likelihood), np.mean(kl)


def _tiny_model_and_params(key=0):
  model = vae_lib.from_fields(FIELDS, IMAGE_SHAPE)
  params = model.init(jax.random.key(key), jnp.zeros((1, *IMAGE_SHAPE)), jnp.zeros((1, 2)))['params']
  return model, params


def test_the_elbo_equals_a_numpy_computation():
  model, params = _tiny_model_and_params()
  x = jax.random.normal(jax.random.key(1), (5, *IMAGE_SHAPE))
  noise = jax.random.normal(jax.random.key(2), (5, 2))
  loss, (nll, kl) = vae_lib.negative_elbo(model, params, x, noise, 0.7)
  expected = numpy_negative_elbo(params, x, noise, 0.7)
  np.testing.assert_allclose([loss, nll, kl], expected, rtol=2e-5, atol=1e-5)
  assert expected[2] > 0  # A KL that a wrong sign or a missing term would change.


def test_a_few_training_steps_lower_the_negative_elbo():
  config = ml_collections.ConfigDict({'vae': {**FIELDS, 'decoder_std': 0.5, 'learning_rate': 1e-2}})
  state = vae_lib.init_train_state(config.vae, IMAGE_SHAPE, jax.random.key(0), learning_rate=1e-2)
  model = vae_lib.from_fields(config.vae, IMAGE_SHAPE)
  images = jax.random.normal(jax.random.key(3), (16, *IMAGE_SHAPE))
  batch = {'unlabeled': {'image': images}}
  step = jax.jit(functools.partial(vae_main.train_step, model=model, decoder_std=0.5))
  noise = jax.random.normal(jax.random.key(4), (16, 2))
  before = float(vae_lib.negative_elbo(model, state.params, images, noise, 0.5)[0])
  for _ in range(30):
    state, metrics = step(state, batch)
  after = float(vae_lib.negative_elbo(model, state.params, images, noise, 0.5)[0])
  assert int(state.step) == 30 and np.isfinite(float(metrics['negative_elbo']))
  assert after < before - 1.0, (before, after)


@pytest.mark.parametrize('architecture,image_shape', [('mlp', (8, 8, 1)), ('conv', (8, 8, 1)),
                                                      ('conv', (32, 32, 3))])
def test_the_decoder_returns_images_of_the_input_shape(architecture, image_shape):
  model = vae_lib.VAE(image_shape=image_shape, latent_dim=5, architecture=architecture, width=4)
  x = jnp.zeros((3, *image_shape))
  shapes = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, jnp.zeros((3, 5)))[0])
  recon, mu, logvar = shapes
  assert (recon.shape, mu.shape, logvar.shape) == ((3, *image_shape), (3, 5), (3, 5))


def test_a_conv_vae_refuses_sides_not_divisible_by_8():
  model = vae_lib.VAE(image_shape=(12, 12, 3), latent_dim=5, architecture='conv', width=4)
  with pytest.raises(errors.ConfigError, match='divisible by 8'):
    model.init(jax.random.key(0), jnp.zeros((1, 12, 12, 3)), jnp.zeros((1, 5)))


@pytest.mark.parametrize('field,value', [('vae.latent_dim', 0), ('vae.architecture', 'rnn'),
                                         ('vae.decoder_std', 0.0), ('vae.learning_rate', -1.0)])
def test_bad_vae_fields_are_named(field, value):
  with pytest.raises(errors.ConfigError, match=f'config.{field}='):
    vae_lib.validate(tiny_config(**{field: value}))


def test_the_description_round_trips_and_an_unreadable_one_is_none(tmp_path):
  config = tiny_config(**{'vae.architecture': 'mlp', 'vae.latent_dim': 3})
  description = vae_lib.describe(config, (8, 8, 1), 'digits', 7)
  vae_lib.write_description(str(tmp_path), description)
  assert vae_lib.read_description(str(tmp_path)) == description
  assert description['image_shape'] == [8, 8, 1] and description['latent_dim'] == 3
  (tmp_path / vae_lib.DESCRIPTION_FILE).write_text('{torn')
  assert vae_lib.read_description(str(tmp_path)) is None
  assert vae_lib.read_description(str(tmp_path / 'absent')) is None
  assert math.isclose(description['decoder_std'], config.vae.decoder_std)
  chex.assert_equal(sorted(vae_lib.ARCHITECTURE_FIELDS),
                    sorted(k for k in description if k not in ('image_shape', 'dataset', 'steps')))
