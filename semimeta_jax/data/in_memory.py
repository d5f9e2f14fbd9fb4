"""Loading an in-memory dataset's splits from TFDS, once, as uint8 arrays.

The only TensorFlow in the in-memory path: the batches themselves are made on
the devices (`device_input.py`).
"""

import numpy as np
import tensorflow_datasets as tfds


def load_split(builder, split):
  """Loads a TFDS split into (uint8 images [N, H, W, C], int64 labels [N]).

  Read in TFDS order (one file at a time), so that index i is `split[i]`.
  """
  ds = builder.as_dataset(
      split=split, shuffle_files=False,
      read_config=tfds.ReadConfig(interleave_cycle_length=1))
  ds = ds.map(lambda ex: (ex['image'], ex['label'])).batch(4096)
  images, labels = [], []
  for image_batch, label_batch in tfds.as_numpy(ds):
    images.append(image_batch)
    labels.append(label_batch)
  return np.concatenate(images), np.concatenate(labels).astype(np.int64)
