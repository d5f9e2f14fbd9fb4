"""Loading an in-memory dataset's splits from TFDS, once, as uint8 arrays.

The only TensorFlow in the in-memory path: the batches themselves are made on
the devices (`device_input.py`).
"""

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds


def load_split(builder, split, spec, *, with_labels=True):
  """Loads a TFDS split into (uint8 images [N, H, W, C], int64 labels [N]).

  Read in TFDS order (one file at a time), so that index i is `split[i]`.

  Args:
    builder: the TFDS builder.
    split: split name or expression.
    spec: the `DatasetSpec`: its feature keys, and its image shape when
      `spec.resize` (area-averaged when shrinking, bilinear when growing).
    with_labels: False for a split without labels (STL-10's 'unlabelled'):
      its labels are -1 whatever the records hold.
  """
  height, width, _ = spec.image_shape

  def example(ex):
    image = ex[spec.image_key]
    if spec.resize:
      image = tf.image.resize(image, (height, width), antialias=True)
      image = tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)
    label = ex[spec.label_key] if with_labels else tf.constant(-1, tf.int64)
    return image, label

  ds = builder.as_dataset(
      split=split, shuffle_files=False,
      read_config=tfds.ReadConfig(interleave_cycle_length=1))
  ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(4096)
  images, labels = [np.zeros((0, height, width, spec.image_shape[2]), np.uint8)], [np.zeros(0)]
  for image_batch, label_batch in tfds.as_numpy(ds):
    images.append(image_batch)
    labels.append(label_batch)
  return np.concatenate(images), np.concatenate(labels).astype(np.int64)
