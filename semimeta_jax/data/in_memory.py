"""Index-based training streams over a split held in host memory.

For digits, CIFAR-10/100 and SVHN the training split is loaded once as a uint8
array. A stream (labeled or unlabeled) draws from a pool of train indices:

  * its infinite order is epoch after epoch of the pool, epoch `e` permuted by
    `tf.random.experimental.stateless_shuffle` with seed (stream seed, e);
  * the GLOBAL batch at step s is positions [s * B, (s + 1) * B) of that order;
    process p computes only rows [p * B / P, (p + 1) * B / P);
  * augmentation draws are `stateless_uniform([B, k], seed=(stream seed, s))`,
    row i belonging to global row i.

So a batch is a pure function of (seed, step): the global batch does not depend
on the number of processes, and a stream started at step k computes batch k
directly, without replaying the steps before it. (TensorFlow keeps its
stateless random streams fixed within a release, not across releases.)
"""

import dataclasses

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from semimeta_jax.data import augment

# Streams are effectively infinite: a range this long never ends.
_LAST_STEP = 2**62


@dataclasses.dataclass(frozen=True)
class Stream:
  """One training stream.

  Attributes:
    pool: int64 train indices the stream draws from (at least one).
    global_batch: examples per step over all processes.
    order_seed: seed of the per-epoch permutations.
    augment_seed: seed of the augmentation draws.
  """
  pool: np.ndarray
  global_batch: int
  order_seed: int
  augment_seed: int


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


def batch_indices(stream, step, rows):
  """Train indices of rows [rows[0], rows[1]) of the global batch at `step`.

  Args:
    stream: the `Stream`.
    step: int64 scalar tensor.
    rows: (start, stop) rows of the global batch this process computes.

  Returns:
    int64 [stop - start] tensor of train indices.
  """
  n = len(stream.pool)
  positions = step * stream.global_batch + tf.range(*rows, dtype=tf.int64)
  epochs = positions // n
  first_epoch = epochs[0]
  # The epochs this slice touches (one or two, more when the pool is smaller
  # than a batch), each permuted with seed (order seed, epoch).
  perms = tf.map_fn(
      lambda e: tf.random.experimental.stateless_shuffle(
          tf.constant(stream.pool, tf.int64),
          seed=tf.stack([tf.constant(stream.order_seed, tf.int64), e])),
      tf.range(first_epoch, epochs[-1] + 1), fn_output_signature=tf.int64)
  return tf.gather_nd(perms, tf.stack([epochs - first_epoch, positions % n], 1))


def batch_draws(stream, step, rows):
  """Uniform augmentation draws of rows [start, stop) of the global batch."""
  seed = tf.stack([tf.constant(stream.augment_seed, tf.int64), step])
  draws = tf.random.stateless_uniform(
      [stream.global_batch, augment.NUM_DRAWS], seed=seed)
  return draws[rows[0]:rows[1]]


def train_dataset(images, labels, streams, *, start_step, process_index,
                  process_count, spec, augment_kind, pad_mode, prefetch):
  """Host-local training batches from step `start_step` on.

  Args:
    images: uint8 [N, H, W, C] training split.
    labels: int [N] training labels.
    streams: dict name -> `Stream` ('labeled', and 'unlabeled' when used).
    start_step: first global step to produce.
    process_index: this process.
    process_count: number of processes.
    spec: the `DatasetSpec` (normalisation, padding).
    augment_kind: augmentation of `augment.augment_batch`.
    pad_mode: 'constant' or 'reflect'.
    prefetch: batches to prepare ahead.

  Returns:
    `tf.data.Dataset` of {stream name: {'image': float32 [b, H, W, C],
    'label': int32 [b], 'index': int32 [b]}}, b = global_batch // process_count.
  """
  images = tf.constant(images)
  labels = tf.constant(labels, tf.int32)

  def make_batch(step):
    out = {}
    for name, stream in streams.items():
      local = stream.global_batch // process_count
      rows = (process_index * local, (process_index + 1) * local)
      index = batch_indices(stream, step, rows)
      batch = augment.augment_batch(
          tf.gather(images, index), batch_draws(stream, step, rows),
          augment_kind, spec.pad, pad_mode)
      out[name] = {'image': augment.normalize(batch, spec.mean, spec.std),
                   'label': tf.gather(labels, index),
                   # Train-split index: per-example state (Temporal Ensembling) is keyed by it.
                   'index': tf.cast(index, tf.int32)}
    return out

  ds = tf.data.Dataset.range(start_step, _LAST_STEP)
  ds = ds.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  return ds.prefetch(prefetch)
