"""Training augmentation of in-memory datasets, in JAX on the device.

  * CIFAR-10/100: pad 4, random 32x32 crop, random horizontal flip.
  * SVHN: pad 4, random crop (no flip: digits are not mirror-symmetric).
  * digits: pad 1, random 8x8 crop (a translation of at most one pixel).

The pad is zeros by default, as the official code (torchvision's
`RandomCrop(32, padding=4)` pads the uint8 image with 0 before normalising);
`config.data.pad_mode='reflect'` mirrors the border (edge pixel not repeated,
as `numpy.pad(mode='reflect')`). Crop corners are uniform over [0, 2 * pad] in
each axis, a flip has probability 1/2; every draw comes from one key per
(stream, step), drawn for the whole global batch, so row i of a batch is the
same however the batch is sharded.
"""

import jax
import jax.numpy as jnp

PAD_MODES = ('constant', 'reflect')
KINDS = ('none', 'pad_crop', 'pad_crop_flip')


def draws(key, batch_size: int, pad: int):
  """(int32 [B, 2] crop corners (y, x) in [0, 2 * pad], bool [B] flips) of one batch."""
  crop_key, flip_key = jax.random.split(key)
  offsets = jax.random.randint(crop_key, (batch_size, 2), 0, 2 * pad + 1, dtype=jnp.int32)
  return offsets, jax.random.bernoulli(flip_key, 0.5, (batch_size,))


def pad_and_crop(images, offsets, pad: int, pad_mode: str = 'constant'):
  """Pads a [B, H, W, C] batch by `pad` pixels and crops each image back at its corner.

  Args:
    images: [B, H, W, C] batch (any dtype; uint8 keeps the zero pad exact).
    offsets: int32 [B, 2] (y, x) crop corners in the padded image, in [0, 2 * pad].
    pad: padding on every side, in pixels.
    pad_mode: 'constant' (zeros) or 'reflect'.

  Returns:
    [B, H, W, C] batch of the same dtype.
  """
  if pad_mode not in PAD_MODES:
    raise ValueError(f'pad_mode={pad_mode!r} must be one of {PAD_MODES}.')
  _, height, width, channels = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=pad_mode)
  crop = lambda image, corner: jax.lax.dynamic_slice(
      image, (corner[0], corner[1], 0), (height, width, channels))
  return jax.vmap(crop)(padded, offsets)


def flip_left_right(images, flip):
  """Mirrors the width axis of the images of a [B, H, W, C] batch where `flip` [B] is True."""
  return jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)


def augment(images, key, kind: str, pad: int, pad_mode: str = 'constant'):
  """Applies a dataset's training augmentation to a uint8 batch.

  Args:
    images: uint8 [B, H, W, C].
    key: the (stream, step) key of the batch's draws.
    kind: 'pad_crop_flip', 'pad_crop' or 'none'.
    pad: padding of the random crop.
    pad_mode: 'constant' or 'reflect'.

  Returns:
    uint8 [B, H, W, C].
  """
  if kind not in KINDS:
    raise ValueError(f'Unknown batch augmentation {kind!r}; expected one of {KINDS}.')
  if kind == 'none':
    return images
  offsets, flips = draws(key, images.shape[0], pad)
  images = pad_and_crop(images, offsets, pad, pad_mode)
  return flip_left_right(images, flips) if kind == 'pad_crop_flip' else images


def normalize(images, mean, std, dtype=jnp.float32):
  """Maps 0..255 pixels to (x / 255 - mean) / std per channel, computed in float32."""
  images = images.astype(jnp.float32) / 255.0
  out = (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return out.astype(dtype)
