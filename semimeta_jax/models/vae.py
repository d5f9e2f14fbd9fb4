"""A small variational autoencoder: the data manifold that TNAR perturbs along.

Encoder q(z|x) = N(mu(x), diag(exp(logvar(x)))), decoder p(x|z) = N(g(z), sigma^2 I)
with a fixed `vae.decoder_std` sigma. The likelihood is Gaussian rather than the
authors' Bernoulli (sigmoid + binary cross-entropy) because the framework's images
are standardised per channel, not in [0, 1].

Two architectures, both without batch norm so that each example's decoding depends
on its own code only (TNAR's J^T J products are then per example by construction):
  'mlp': flatten -> Dense(width) -> Dense(2 * latent); mirrored decoder (8x8 digits).
  'conv': three stride-2 4x4 convolutions (width, 2 width, 4 width), leaky ReLU 0.1,
     then Dense to the code; the decoder mirrors it with transposed convolutions (the
     authors' CIFAR-10 VAE without its batch norm). Height and width divisible by 8.

The `vae` block holds the architecture and the training fields; `vae.json` in the
VAE's directory records what a classifier run needs to rebuild and check it.
"""

import json
import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from semimeta_jax import errors
from semimeta_jax import state as state_lib

ARCHITECTURES = ('mlp', 'conv')
DESCRIPTION_FILE = 'vae.json'
# The fields of the `vae` block that define the network (the rest are training settings).
ARCHITECTURE_FIELDS = ('architecture', 'latent_dim', 'width', 'decoder_std')


def config_block() -> ml_collections.ConfigDict:
  """The `vae` block: the network and its ELBO training (`python -m semimeta_jax.vae_main`)."""
  return ml_collections.ConfigDict({
      'architecture': 'conv',
      'latent_dim': 512,  # The authors' CIFAR-10 code.
      'width': 128,  # Channels of the first convolution / units of the hidden layer.
      'decoder_std': 0.5,  # sigma of p(x|z), in standardised pixel units.
      'learning_rate': 1e-3,  # Adam, as the authors' train_vae.py.
      'batch_size': 64,
      'num_train_steps': 20_000,
  })


def validate(config) -> None:
  """The `vae` fields, each named in the error."""
  require, block = errors.require, config.vae
  require(block.architecture in ARCHITECTURES, 'vae.architecture', block.architecture,
          f'expected one of {ARCHITECTURES}')
  for name in ('latent_dim', 'width', 'batch_size', 'num_train_steps'):
    value = block[name]
    require(isinstance(value, int) and value >= 1, f'vae.{name}', value, 'must be an integer >= 1')
  require(block.decoder_std > 0, 'vae.decoder_std', block.decoder_std, 'must be > 0')
  require(block.learning_rate > 0, 'vae.learning_rate', block.learning_rate, 'must be > 0')


class VAE(nn.Module):
  """Encoder (x -> mu, logvar) and decoder (z -> mean image) of one image shape."""
  image_shape: Sequence[int]
  latent_dim: int
  architecture: str = 'conv'
  width: int = 128

  def setup(self):
    height, width, channels = self.image_shape
    if self.architecture == 'mlp':
      self.encoder_layers = [nn.Dense(self.width, name='enc_hidden')]
      self.decoder_layers = [nn.Dense(self.width, name='dec_hidden')]
      self.decoder_out = nn.Dense(height * width * channels, name='dec_out')
    else:
      if height % 8 or width % 8:
        raise errors.ConfigError(f'config.vae.architecture=\'conv\': the image is {height}x{width}; '
                                 'it needs a height and width divisible by 8 (use \'mlp\').')
      widths = (self.width, 2 * self.width, 4 * self.width)
      self.encoder_layers = [nn.Conv(w, (4, 4), strides=2, name=f'enc_conv{i}')
                             for i, w in enumerate(widths)]
      self.decoder_in = nn.Dense(height // 8 * width // 8 * widths[-1], name='dec_in')
      self.decoder_layers = [nn.ConvTranspose(w, (4, 4), strides=(2, 2), name=f'dec_conv{i}')
                             for i, w in enumerate((widths[1], widths[0]))]
      self.decoder_out = nn.ConvTranspose(channels, (4, 4), strides=(2, 2), name='dec_out')
    self.to_mu = nn.Dense(self.latent_dim, name='to_mu')
    self.to_logvar = nn.Dense(self.latent_dim, name='to_logvar')

  def encode(self, x):
    """(mu, logvar), each [B, latent_dim], of images x [B, H, W, C]."""
    h = x.reshape(x.shape[0], -1) if self.architecture == 'mlp' else x
    for layer in self.encoder_layers:
      h = nn.leaky_relu(layer(h), 0.1)
    h = h.reshape(h.shape[0], -1)
    return self.to_mu(h), self.to_logvar(h)

  def decode(self, z):
    """The mean image g(z) [B, H, W, C] of codes z [B, latent_dim]."""
    height, width, channels = self.image_shape
    if self.architecture == 'mlp':
      h = nn.leaky_relu(self.decoder_layers[0](z), 0.1)
      return self.decoder_out(h).reshape(z.shape[0], height, width, channels)
    h = nn.leaky_relu(self.decoder_in(z), 0.1)
    h = h.reshape(z.shape[0], height // 8, width // 8, -1)
    for layer in self.decoder_layers:
      h = nn.leaky_relu(layer(h), 0.1)
    return self.decoder_out(h)

  def __call__(self, x, noise):
    """(reconstruction, mu, logvar) of x with the code mu + exp(logvar / 2) * noise."""
    mu, logvar = self.encode(x)
    return self.decode(mu + jnp.exp(0.5 * logvar) * noise), mu, logvar


def from_fields(fields, image_shape) -> VAE:
  """The VAE of a `vae` block (or its saved description) for images of `image_shape`."""
  return VAE(image_shape=tuple(image_shape), latent_dim=fields['latent_dim'],
             architecture=fields['architecture'], width=fields['width'])


def init_train_state(fields, image_shape, key, learning_rate: float = 1e-3) -> state_lib.TrainState:
  """The step-0 VAE state of a `vae` block (or description): parameters and Adam's moments.

  The structure a saved VAE is restored into; the learning rate does not change it.
  """
  model = from_fields(fields, image_shape)
  init_key, base_key = jax.random.split(key)
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  noise = jnp.zeros((1, fields['latent_dim']), jnp.float32)
  params = model.init(init_key, dummy, noise)['params']
  return state_lib.TrainState.create(apply_fn=model.apply, params=params, batch_stats={},
                                     tx=optax.adam(learning_rate), rng=base_key)


def negative_elbo(model: VAE, params, x, noise, decoder_std: float):
  """-ELBO per example, averaged over the batch, with its two parts.

  ELBO(x) = E_q[log N(x; g(z), sigma^2 I)] - KL(q(z|x) || N(0, I)), the expectation
  estimated with the one code mu + exp(logvar / 2) * noise.

  Returns:
    (mean -ELBO, (mean reconstruction negative log-likelihood, mean KL)).
  """
  recon, mu, logvar = model.apply({'params': params}, x, noise)
  dims = math.prod(x.shape[1:])
  squared = jnp.sum(jnp.square(x - recon).reshape(x.shape[0], -1), axis=1)
  nll = 0.5 * squared / decoder_std ** 2 + dims * (math.log(decoder_std) + 0.5 * math.log(2 * math.pi))
  kl = 0.5 * jnp.sum(jnp.square(mu) + jnp.exp(logvar) - 1.0 - logvar, axis=1)
  return jnp.mean(nll + kl), (jnp.mean(nll), jnp.mean(kl))


def describe(config, image_shape, dataset: str, steps: int) -> dict[str, Any]:
  """The description saved beside a trained VAE (what a classifier run checks)."""
  return {'image_shape': [int(d) for d in image_shape], 'dataset': dataset, 'steps': int(steps),
          **{name: config.vae[name] for name in ARCHITECTURE_FIELDS}}


def write_description(directory: str, description: dict[str, Any]) -> None:
  """Writes `vae.json` atomically (a reader sees the old file or the whole new one)."""
  path = os.path.join(directory, DESCRIPTION_FILE)
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(description, f, indent=1, sort_keys=True)
  os.replace(path + '.tmp', path)


def read_description(directory: str) -> dict[str, Any] | None:
  """The saved description of the VAE in `directory`, or None when there is none (or unreadable)."""
  try:
    with open(os.path.join(directory, DESCRIPTION_FILE), encoding='utf-8') as f:
      description = json.load(f)
  except (OSError, ValueError):
    return None
  return description if isinstance(description, dict) else None
