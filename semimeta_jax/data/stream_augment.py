"""ImageNet's decoding views (TensorFlow ops, on the host).

  * training: random-resized crop (area 0.1-1, aspect 0.8-1.25) + flip;
  * evaluation: shorter side to 256/224 of the crop, centre crop.

All randomness is stateless: the caller passes seeds that are functions of (run
seed, stream, position). The in-memory datasets are augmented on the device
(`device_augment.py`).
"""

import tensorflow as tf


def to_uint8(images):
  """Rounds 0..255 float pixels to uint8, the form that crosses the host-device link."""
  return tf.cast(tf.round(tf.clip_by_value(images, 0.0, 255.0)), tf.uint8)


def normalize(images, mean, std):
  """Maps 0..255 pixels to float32 (x / 255 - mean) / std, per channel."""
  images = tf.cast(images, tf.float32) / 255.0
  return (images - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def _shape_and_window_decoder(encoded, channels, jpeg):
  """(image shape [3], fn(y, x, h, w) -> the decoded window) of an encoded image.

  A JPEG decodes only its window; other formats (PNG) decode whole, then crop.
  """
  if jpeg:
    return tf.image.extract_jpeg_shape(encoded), lambda y, x, h, w: tf.image.decode_and_crop_jpeg(
        encoded, tf.stack([y, x, h, w]), channels=channels)
  image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
  return tf.shape(image), lambda y, x, h, w: tf.slice(image, tf.stack([y, x, 0]),
                                                      tf.stack([h, w, channels]))


def random_resized_crop(encoded, seed, size, area_range=(0.1, 1.0),
                        aspect_range=(0.8, 1.25), flip=True, channels=3, jpeg=True):
  """Decodes an image through a random crop, resized to `size` x `size`.

  The crop covers `area_range` of the image with an aspect ratio in
  `aspect_range` (the official DALI pipeline's ranges); if no such crop is found
  in 100 attempts the whole image is used. Of a JPEG only the crop window is decoded.

  Args:
    encoded: scalar string, the encoded image.
    seed: int [2] stateless seed of this example.
    size: output side.
    area_range: range of the crop's fraction of the image area.
    aspect_range: range of the crop's width / height.
    flip: whether to mirror the crop with probability 1/2.
    channels: channels of the output (1 or 3).
    jpeg: whether `encoded` is a JPEG (else any format `tf.io.decode_image` reads).

  Returns:
    float32 [size, size, channels] with values in [0, 255].
  """
  crop_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 2))
  shape, decode_window = _shape_and_window_decoder(encoded, channels, jpeg)
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=crop_seed, min_object_covered=0.0, aspect_ratio_range=aspect_range,
      area_range=area_range, max_attempts=100,
      use_image_if_no_bounding_boxes=True)
  y, x, _ = tf.unstack(begin)
  h, w, _ = tf.unstack(crop_size)
  image = decode_window(y, x, h, w)
  image = tf.image.resize(image, (size, size), antialias=True)
  if flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return tf.clip_by_value(image, 0.0, 255.0)


def center_crop(encoded, size, channels=3):
  """Evaluation view: shorter side to size * 256 / 224, then a centre crop.

  Args:
    encoded: scalar string, the encoded image (JPEG, PNG, ...).
    size: output side (224 gives the standard 256 -> 224 protocol).
    channels: channels of the output (1 or 3).

  Returns:
    float32 [size, size, channels] with values in [0, 255].
  """
  image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  target = round(size * 256 / 224)
  scale = target / tf.reduce_min(shape)
  new_shape = tf.cast(tf.round(shape * scale), tf.int32)
  new_shape = tf.maximum(new_shape, size)
  image = tf.image.resize(image, new_shape, antialias=True)
  top = (new_shape[0] - size) // 2
  left = (new_shape[1] - size) // 2
  image = image[top:top + size, left:left + size]
  image = tf.ensure_shape(image, (size, size, channels))
  return tf.clip_by_value(image, 0.0, 255.0)
