"""On-device stochastic input perturbations for the consistency baselines.

The input pipeline gives each step one augmented view of every image. The Pi-model
and Mean Teacher compare two predictions of the same image under *different* noise,
so each view is perturbed again here, inside the jitted step, from the step's key:

  * a random translation of up to `perturb.max_translation` pixels along each axis: a crop
    of the image padded by reflection, as in Laine & Aila's reference code;
  * optionally a random horizontal flip drawn per view. The pipeline's own flip is
    shared by both views, which is what the Pi-model code does; the per-view flip
    is off by default;
  * additive Gaussian noise of standard deviation `noise_std`, the papers' input
    noise layer (0.15 on normalised CIFAR-10 / SVHN images).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from semimeta_jax import errors
from semimeta_jax.data import specs

# Earlier flat names of the `perturb` block's fields.
renamed_fields = {'input_noise_std': 'perturb.noise_std', 'max_translation': 'perturb.max_translation',
                  'perturb_flip': 'perturb.flip'}


def config_blocks():
  """The `perturb` block, read by the Pi-model, Mean Teacher and Temporal Ensembling."""
  return {'perturb': ml_collections.ConfigDict({
      'noise_std': 0.15,  # Gaussian input noise (the papers' 0.15 on normalised images).
      'max_translation': 2,  # Pixels.
      'flip': False,  # Independent horizontal flips per view (the pipeline flips both alike).
  })}


def translate(images: jax.Array, offsets: jax.Array, max_translation: int) -> jax.Array:
  """Shifts each image by its own offset, filling the border by reflection.

  Args:
    images: [B, H, W, C] batch.
    offsets: int32 [B, 2] (y, x) crop corners in the padded image, in
      [0, 2 * max_translation]; `max_translation` in both is the identity.
    max_translation: the padding on every side, in pixels.

  Returns:
    [B, H, W, C] batch of the same dtype.
  """
  pad = max_translation
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode='reflect')
  size = images.shape[1:]
  crop = lambda image, offset: jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), size)
  return jax.vmap(crop)(padded, offsets)


def perturb(key: jax.Array, images: jax.Array, *, max_translation: int, flip: bool,
            noise_std: float) -> jax.Array:
  """One random view of a batch: translation, optional flip, Gaussian noise.

  Every example draws its own translation, flip and noise. With
  `max_translation=0, flip=False, noise_std=0` the batch comes back unchanged.

  Args:
    key: the view's PRNG key.
    images: [B, H, W, C] batch.
    max_translation: largest shift along each axis, in pixels.
    flip: whether to mirror each example horizontally with probability 1/2.
    noise_std: standard deviation of the additive Gaussian noise.

  Returns:
    The perturbed batch, same shape and dtype.
  """
  translation_key, flip_key, noise_key = jax.random.split(key, 3)
  batch = images.shape[0]
  if max_translation > 0:
    offsets = jax.random.randint(translation_key, (batch, 2), 0, 2 * max_translation + 1)
    images = translate(images, offsets, max_translation)
  if flip:
    mirrored = jax.random.bernoulli(flip_key, 0.5, (batch,))
    images = jnp.where(mirrored[:, None, None, None], images[:, :, ::-1], images)
  if noise_std > 0:
    noise = jax.random.normal(noise_key, images.shape, images.dtype)
    images = images + jnp.asarray(noise_std, images.dtype) * noise
  return images


def validate(config) -> None:
  """The perturbation fields of every method that perturbs its inputs here.

  Raises:
    errors.ConfigError: naming the field.
  """
  block = config.perturb
  errors.require(block.noise_std >= 0, 'perturb.noise_std', block.noise_std, 'must be >= 0')
  errors.require(isinstance(block.max_translation, int) and block.max_translation >= 0,
                 'perturb.max_translation', block.max_translation, 'must be an integer >= 0')


def from_config(config):
  """`perturb` with its options read from the config: `(key, images) -> images`.

  Reads the `perturb` block (`config_blocks`).
  """
  return functools.partial(
      perturb,
      max_translation=int(config.perturb.max_translation),
      flip=bool(config.perturb.flip),
      noise_std=float(config.perturb.noise_std))


def pixel_std(config, channels: int):
  """The dataset's per-channel std of its [0, 1] pixels, [channels] float32; None if it registers none.

  A radius r in [0, 1] pixel units is r / std in the standardised units the network
  sees ((x - mean) / std). Only a built-in or registered dataset has fixed
  statistics (a folder or a TFDS dataset by name has its labeled pool's, computed
  when the run starts). Inputs whose channel count differs from the dataset's (the
  tests' one-channel synthetic batches under a three-channel name) take the mean
  of its stds for every channel.
  """
  spec = None if config.data.folder else specs.builtin_spec(config.data)
  if spec is None or spec.std is None:
    return None
  std = np.asarray(spec.std, np.float32)
  return std if std.shape[0] == channels else np.full((channels,), std.mean(), np.float32)


def require_pixel_std(config, field: str, value) -> None:
  """One clear error when `field` is in [0, 1] pixel units and the dataset registers no std.

  Raises:
    errors.ConfigError: naming `field`.
  """
  errors.require(pixel_std(config, 1) is not None, field, value,
                 f'is in [0, 1] pixel units, and dataset {config.data.folder or config.data.name!r} '
                 'registers no normalisation std to convert it with')
