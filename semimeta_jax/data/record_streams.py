"""Streams over TFDS records for a split too large for memory (ImageNet).

Each process reads only its own contiguous share of the split
(`splits.even_bounds`, the same shares as `tfds.even_splits`), sliced by
absolute record ranges so every record's index into the split is known. The
share is cut into `chunks` contiguous ranges, each read in TFDS order
(`interleave_cycle_length=1`) with its images left encoded.

Training stream of one process (the labeled or unlabeled records of its share):

  * epoch `e` samples the chunks at random in proportion to their sizes (seed
    from (stream seed, e)), then passes through a shuffle buffer (seed from
    (stream seed, e)); so the order is a deterministic function of the epoch;
  * a stream resumed at step k starts directly at epoch `k * b // n` (no reading
    of the epochs before) and skips the records before its position in that
    epoch; the skipped records are read but never decoded;
  * example j of the stream is augmented with stateless seed (stream seed, j).

Unlike the in-memory datasets, the batches depend on the number of processes
(each reads its own share): a resumed run must keep the process count, which a
multi-host ImageNet run does anyway. A labeled stream reads its whole share to
find its records, so with 10% labels it reads ten records per labeled one; the
OS page cache holds those reads on a host with memory for the dataset.
"""

import concurrent.futures

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from semimeta_jax.data import splits

_LAST = 2**62
_READ_CONFIG = tfds.ReadConfig(interleave_cycle_length=1)


def num_ranges(num_records, most=16, min_records=1024):
  """How many ranges to read concurrently: up to `most`, none tiny."""
  return max(1, min(most, num_records // min_records))


def _read_range(builder, split, start, stop, decoders):
  ds = builder.as_dataset(split=f'{split}[{start}:{stop}]', shuffle_files=False,
                          decoders=decoders, read_config=_READ_CONFIG)
  # `take` keeps the range exact even where a reader yields more (mock data).
  return ds.take(stop - start)


def scan_labels(builder, split, num_examples, num_readers=None, label_key='label'):
  """Reads the labels of a whole split (images skipped), in split order.

  Args:
    builder: the TFDS builder.
    split: split name.
    num_examples: size of the split.
    num_readers: ranges read in parallel; default `num_ranges(num_examples)`.
    label_key: the label feature.

  Returns:
    int64 [num_examples] labels.
  """
  num_readers = num_readers or num_ranges(num_examples)
  bounds = splits.even_bounds(num_examples, num_readers)
  decoders = tfds.decode.PartialDecoding({label_key: True})
  # Pipelines are built here, read concurrently below: building is cheap, and
  # TFDS's builder is not meant to be entered from several threads.
  readers = [
      _read_range(builder, split, lo, hi, decoders).map(
          lambda ex: ex[label_key]).batch(65536)
      for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]

  def read(ds):
    return np.concatenate(
        [np.zeros((0,), np.int64)] + list(tfds.as_numpy(ds))).astype(np.int64)

  with concurrent.futures.ThreadPoolExecutor(len(readers)) as pool:
    return np.concatenate(list(pool.map(read, readers)))


def encoded_examples(builder, split, start, stop, keep, keys):
  """(encoded image, label, split index) of the kept records of [start, stop).

  `keys` is (image feature, label feature or None: a split without labels,
  whose label is then -1).
  """
  image_key, label_key = keys
  ds = _read_range(builder, split, start, stop,
                   {image_key: tfds.decode.SkipDecoding()})
  ds = ds.enumerate(start=start)
  keep = tf.constant(keep)
  ds = ds.filter(lambda i, ex: keep[i - start])

  def image_label_index(i, ex):
    label = ex[label_key] if label_key else tf.constant(-1, tf.int64)
    return ex[image_key], label, i

  return ds.map(image_label_index)


def train_dataset(builder, split, pool_mask, share, *, batch_size, start_step,
                  order_seed, augment_seed, preprocess, chunks=None,
                  shuffle_buffer=16384, keys=('image', 'label'), index_offset=0):
  """One process's batches of a training stream over a record split.

  Args:
    builder: the TFDS builder.
    split: split name ('train').
    pool_mask: bool [N], the split's records this stream draws from.
    share: (start, stop) record range of this process.
    batch_size: examples per batch of this process.
    start_step: first step to produce.
    order_seed: seed of the epoch orders.
    augment_seed: seed of the per-example augmentation.
    preprocess: fn(encoded image, int64 [2] seed) -> uint8 [H, W, C] (it crosses the
      host-device link as uint8 and is normalised on the device).
    chunks: ranges of the share read concurrently; default
      `num_ranges(share size)`.
    shuffle_buffer: examples in the shuffle buffer of each epoch.
    keys: (image feature, label feature); a None label feature reads a split
      without labels: its batches carry no 'label'.
    index_offset: added to the split index to make 'index' (the rows of an
      unlabeled split follow the train split's).

  Returns:
    `tf.data.Dataset` of {'image': uint8 [b, H, W, C], 'label': int32 [b],
    'index': int32 [b]}.

  Raises:
    ValueError: the share holds none of the pool's records.
  """
  start, stop = share
  size = int(pool_mask[start:stop].sum())
  if not size:
    raise ValueError(
        f'Records [{start}, {stop}) of {split!r}, this process\'s share, hold '
        'none of the stream\'s examples; use fewer processes or more labels.')
  chunks = chunks or num_ranges(stop - start)
  bounds = start + splits.even_bounds(stop - start, chunks)
  sources, weights = [], []
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    kept = int(pool_mask[lo:hi].sum())
    if kept:
      sources.append(encoded_examples(builder, split, lo, hi,
                                      pool_mask[lo:hi], keys))
      weights.append(kept / size)

  def epoch(e):
    seed = order_seed * 1_000_003 + 2 * e
    ds = tf.data.Dataset.sample_from_datasets(
        sources, weights=weights, seed=seed, stop_on_empty_dataset=False)
    return ds.shuffle(shuffle_buffer, seed=seed + 1)

  first = start_step * batch_size
  ds = tf.data.Dataset.range(first // size, _LAST).flat_map(epoch)
  ds = tf.data.Dataset.zip(tf.data.Dataset.range(first, _LAST),
                           ds.skip(first % size))

  def decode(position, example):
    encoded, label, index = example
    seed = tf.stack([tf.constant(augment_seed, tf.int64), position])
    example = {'image': preprocess(encoded, seed),
               # Training-row index: per-example state (Temporal Ensembling) is keyed by it.
               'index': tf.cast(index + index_offset, tf.int32)}
    if keys[1]:
      example['label'] = tf.cast(label, tf.int32)
    return example

  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.batch(batch_size, drop_remainder=True)


def eval_batches(builder, split, share, batch_size, preprocess, keys=('image', 'label')):
  """Yields one process's share of an evaluation split, in order.

  Args:
    builder: the TFDS builder.
    split: split name.
    share: (start, stop) record range of this process.
    batch_size: examples per batch (the last one may be short).
    preprocess: fn(encoded image) -> float32 [H, W, C].
    keys: (image feature, label feature).

  Yields:
    numpy {'image': float32 [<= batch_size, H, W, C], 'label': int32 [...]}.
  """
  start, stop = share
  if start == stop:
    return
  image_key, label_key = keys
  ds = _read_range(builder, split, start, stop,
                   {image_key: tfds.decode.SkipDecoding()})
  ds = ds.map(lambda ex: {'image': preprocess(ex[image_key]),
                          'label': tf.cast(ex[label_key], tf.int32)},
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  yield from tfds.as_numpy(ds.batch(batch_size).prefetch(2))
