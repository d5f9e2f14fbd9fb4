"""Exact evaluation: every test example counted once, on any process count.

Process `p` of `P` reads the contiguous share `splits.even_bounds(N, P)[p:p+2]`
of the test split, in order, in batches of `eval_batch_size // P`. The last
batch is padded with zeros and a False `mask`, and a process whose share needs
fewer batches than the largest share yields fully masked batches, so every
process yields the same number of batches (a collective step never waits on a
process that stopped early).
"""

import math

import numpy as np

from semimeta_jax.data import splits


def num_eval_batches(num_examples, process_count, batch_size):
  """Batches each process yields: enough for the largest share."""
  largest_share = math.ceil(num_examples / process_count)
  return math.ceil(largest_share / batch_size)


def share_bounds(num_examples, process_index, process_count):
  """[start, stop) of this process's share of the test split."""
  bounds = splits.even_bounds(num_examples, process_count)
  return int(bounds[process_index]), int(bounds[process_index + 1])


def _padded(images, labels, batch_size, image_shape):
  count = len(labels)
  out_images = np.zeros((batch_size, *image_shape), np.float32)
  out_labels = np.zeros((batch_size,), np.int32)
  mask = np.zeros((batch_size,), bool)
  out_images[:count] = images
  out_labels[:count] = labels
  mask[:count] = True
  return {'image': out_images, 'label': out_labels, 'mask': mask}


def padded_batches(batches, num_batches, batch_size, image_shape):
  """Pads a stream of (possibly short) batches to exactly `num_batches`.

  Args:
    batches: iterable of dicts with float32 'image' [n, H, W, C] and 'label'
      [n], n <= batch_size.
    num_batches: number of batches to yield.
    batch_size: rows of every yielded batch.
    image_shape: (H, W, C).

  Yields:
    {'image': float32 [batch_size, H, W, C], 'label': int32 [batch_size],
     'mask': bool [batch_size]}; masked rows are zeros.

  Raises:
    ValueError: the stream has more than `num_batches` batches.
  """
  count = 0
  for batch in batches:
    if count == num_batches:
      raise ValueError(f'Evaluation share has more than {num_batches} batches.')
    yield _padded(batch['image'], batch['label'], batch_size, image_shape)
    count += 1
  empty = np.zeros((0, *image_shape), np.float32)
  for _ in range(num_batches - count):
    yield _padded(empty, np.zeros((0,), np.int32), batch_size, image_shape)


def array_batches(images, labels, batch_size, mean, std):
  """Normalised batches of an in-memory uint8 share, in order (last one short).

  Args:
    images: uint8 [n, H, W, C].
    labels: int [n].
    batch_size: rows per batch.
    mean: per-channel mean of the [0, 1] pixels.
    std: per-channel standard deviation of the [0, 1] pixels.

  Yields:
    {'image': float32 [<= batch_size, H, W, C], 'label': int32 [...]}.
  """
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  for start in range(0, len(labels), batch_size):
    chunk = images[start:start + batch_size].astype(np.float32) / 255.0
    yield {'image': (chunk - mean) / std,
           'label': labels[start:start + batch_size].astype(np.int32)}
