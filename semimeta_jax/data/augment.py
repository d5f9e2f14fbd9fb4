"""Training augmentations and evaluation preprocessing (TensorFlow ops).

All randomness is stateless: the caller passes uniform draws or seeds that are
functions of (run seed, stream, step, position), so a batch is the same however
many processes compute it and whether or not the run was resumed.

  * CIFAR-10/100: pad 4, random 32x32 crop, random horizontal flip.
  * SVHN: pad 4, random crop (no flip: digits are not mirror-symmetric).
  * digits: pad 1, random 8x8 crop (a translation of at most one pixel).
  * ImageNet: random-resized crop (area 0.1-1, aspect 0.8-1.25) + flip for
    training; shorter side to 256/224 of the crop, centre crop for evaluation.

The pad is zeros by default, as the official code (torchvision's
`RandomCrop(32, padding=4)` pads with 0 before normalising);
`config.data.pad_mode='reflect'` mirrors the border instead.
"""

import tensorflow as tf

# Per-example uniform draws that `augment_batch` consumes: crop y, crop x, flip.
NUM_DRAWS = 3
PAD_MODES = {'constant': 'CONSTANT', 'reflect': 'REFLECT'}


def normalize(images, mean, std):
  """Maps 0..255 pixels to float32 (x / 255 - mean) / std, per channel."""
  images = tf.cast(images, tf.float32) / 255.0
  return (images - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def pad_and_crop(images, offsets, pad, pad_mode='constant'):
  """Pads a batch by `pad` pixels and crops each image back at its own offset.

  Args:
    images: [B, H, W, C] batch.
    offsets: int32 [B, 2] (y, x) crop corners in the padded image, in
      [0, 2 * pad].
    pad: padding on every side, in pixels.
    pad_mode: 'constant' (zeros) or 'reflect'.

  Returns:
    [B, H, W, C] batch of the same dtype.
  """
  height, width = images.shape[1], images.shape[2]
  padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]],
                  mode=PAD_MODES[pad_mode])
  rows = offsets[:, :1] + tf.range(height)[None]
  cols = offsets[:, 1:] + tf.range(width)[None]
  # Gathers keep the crop per example and vectorised over the batch.
  out = tf.gather(padded, rows, axis=1, batch_dims=1)
  return tf.gather(out, cols, axis=2, batch_dims=1)


def flip_left_right(images, flip):
  """Mirrors the images of a batch where the boolean [B] `flip` is True."""
  return tf.where(flip[:, None, None, None], tf.reverse(images, [2]), images)


def augment_batch(images, draws, kind, pad, pad_mode='constant'):
  """Applies the per-dataset training augmentation to a uint8 batch.

  Args:
    images: uint8 [B, H, W, C].
    draws: float32 [B, NUM_DRAWS] uniform draws in [0, 1), one row per example.
    kind: 'pad_crop_flip', 'pad_crop' or 'none'.
    pad: padding of the random crop.
    pad_mode: 'constant' or 'reflect'.

  Returns:
    uint8 [B, H, W, C].
  """
  if kind == 'none':
    return images
  if kind not in ('pad_crop', 'pad_crop_flip'):
    raise ValueError(f'Unknown batch augmentation {kind!r}.')
  offsets = tf.cast(tf.floor(draws[:, :2] * (2 * pad + 1)), tf.int32)
  images = pad_and_crop(images, offsets, pad, pad_mode)
  if kind == 'pad_crop_flip':
    images = flip_left_right(images, draws[:, 2] < 0.5)
  return images


def random_resized_crop(encoded, seed, size, area_range=(0.1, 1.0),
                        aspect_range=(0.8, 1.25), flip=True):
  """Decodes a JPEG through a random crop, resized to `size` x `size`.

  The crop covers `area_range` of the image with an aspect ratio in
  `aspect_range` (the official DALI pipeline's ranges); if no such crop is found
  in 100 attempts the whole image is used. Only the crop window is decoded.

  Args:
    encoded: scalar string, JPEG bytes.
    seed: int [2] stateless seed of this example.
    size: output side.
    area_range: range of the crop's fraction of the image area.
    aspect_range: range of the crop's width / height.
    flip: whether to mirror the crop with probability 1/2.

  Returns:
    float32 [size, size, 3] with values in [0, 255].
  """
  crop_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 2))
  shape = tf.image.extract_jpeg_shape(encoded)
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=crop_seed, min_object_covered=0.0, aspect_ratio_range=aspect_range,
      area_range=area_range, max_attempts=100,
      use_image_if_no_bounding_boxes=True)
  y, x, _ = tf.unstack(begin)
  h, w, _ = tf.unstack(crop_size)
  image = tf.image.decode_and_crop_jpeg(encoded, tf.stack([y, x, h, w]),
                                        channels=3)
  image = tf.image.resize(image, (size, size), antialias=True)
  if flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return tf.clip_by_value(image, 0.0, 255.0)


def center_crop(encoded, size):
  """Evaluation view: shorter side to size * 256 / 224, then a centre crop.

  Args:
    encoded: scalar string, JPEG bytes.
    size: output side (224 gives the standard 256 -> 224 protocol).

  Returns:
    float32 [size, size, 3] with values in [0, 255].
  """
  image = tf.io.decode_jpeg(encoded, channels=3)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  target = round(size * 256 / 224)
  scale = target / tf.reduce_min(shape)
  new_shape = tf.cast(tf.round(shape * scale), tf.int32)
  new_shape = tf.maximum(new_shape, size)
  image = tf.image.resize(image, new_shape, antialias=True)
  top = (new_shape[0] - size) // 2
  left = (new_shape[1] - size) // 2
  image = image[top:top + size, left:left + size]
  image = tf.ensure_shape(image, (size, size, 3))
  return tf.clip_by_value(image, 0.0, 255.0)
