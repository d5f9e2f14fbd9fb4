"""The input of a streamed (record) dataset: ImageNet through tf.data.

The counterpart of `resident_input.py` for a split too large for the devices
(ImageNet, a large TFDS dataset by name). Each process reads its share of the
records (`record_streams.py`), decodes and
augments on the host, and ships uint8 batches (a quarter of float32's bytes)
that `device_input.Prefetcher` copies to the devices a few steps ahead and
normalises there.
"""

import dataclasses

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from semimeta_jax.data import device_input
from semimeta_jax.data import eval_batches
from semimeta_jax.data import input_contract
from semimeta_jax.data import normalization
from semimeta_jax.data import record_streams
from semimeta_jax.data import specs
from semimeta_jax.data import splits
from semimeta_jax.data import stream_augment
from semimeta_jax.data import tfds_builders
from semimeta_jax.data import train_pools


def _hide_gpus_from_tensorflow():
  # The accelerators belong to JAX; TensorFlow only feeds the host.
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # Already initialised: nothing left to hide.
    pass


def _train_view(spec, augment_kind):
  """fn(encoded, seed) -> float32 training image: a random-resized crop, or the eval view."""
  size, channels = spec.image_shape[0], spec.image_shape[2]
  if augment_kind == 'none':
    return lambda x, seed: stream_augment.center_crop(x, size, channels)
  return lambda x, seed: stream_augment.random_resized_crop(x, seed, size, channels=channels,
                                                            jpeg=spec.jpeg)


def _train_dataset(builder, spec, config, pools, augment_kind, start_step, process_index,
                   process_count, num_labeled_rows):
  """Zipped per-process record streams of uint8 batches.

  The labeled stream (and an unlabeled one drawn from the train split) reads
  the train split; the unlabeled stream of a dataset with an unlabeled split
  reads that split alone, its rows numbered after the train split's.
  """
  view = _train_view(spec, augment_kind)
  preprocess = lambda x, seed: stream_augment.to_uint8(view(x, seed))
  streams = {}
  for name, (pool, batch, stream_id) in pools.items():
    if name == 'unlabeled' and spec.num_unlabeled:
      split, offset, rows = spec.unlabeled_split, num_labeled_rows, spec.num_unlabeled
      keys = (spec.image_key, None)
    else:
      split, offset, rows = spec.train_split, 0, num_labeled_rows
      keys = (spec.image_key, spec.label_key)
    mask = np.zeros(rows, bool)
    mask[pool - offset] = True
    bounds = splits.even_bounds(rows, process_count)
    share = (int(bounds[process_index]), int(bounds[process_index + 1]))
    order_seed, augment_seed = train_pools.stream_seeds(config.seed, stream_id)
    streams[name] = record_streams.train_dataset(
        builder, split, mask, share,
        batch_size=batch // process_count, start_step=start_step,
        order_seed=order_seed % 2**31, augment_seed=augment_seed,
        preprocess=preprocess, shuffle_buffer=config.data.shuffle_buffer,
        keys=keys, index_offset=offset)
  return tf.data.Dataset.zip(streams).prefetch(config.data.prefetch_batches)


def _labeled_sample(builder, spec, labeled, limit=2048):
  """uint8 evaluation views of the first `limit` labeled examples (normalisation statistics)."""
  chosen = np.asarray(labeled[:limit])
  keep = np.zeros(int(chosen[-1]) + 1, bool)
  keep[chosen] = True
  size, channels = spec.image_shape[0], spec.image_shape[2]
  reader = record_streams.encoded_examples(builder, spec.train_split, 0, len(keep), keep,
                                      (spec.image_key, None))
  reader = reader.map(lambda image, label, index: stream_augment.to_uint8(
      stream_augment.center_crop(image, size, channels)))
  return np.concatenate([batch for batch in tfds.as_numpy(reader.batch(256))])


def build(config, workdir, spec, augment_kind, *, start_step, process_index, process_count, mesh,
          uses_unlabeled, strong_view=None) -> input_contract.Input:
  """The `Input` of a streamed dataset (arguments as `pipeline.build_input`'s, checked there)."""
  data = config.data
  _hide_gpus_from_tensorflow()
  builder = tfds_builders.get_builder(spec, data)
  num_labeled_rows = tfds_builders.split_size(builder, spec.train_split)
  num_unlabeled = (tfds_builders.split_size(builder, spec.unlabeled_split) if spec.unlabeled_split
                   else 0)
  if num_unlabeled and data.unlabeled_includes_labeled:
    raise input_contract.InputConfigError(
        'config.data.unlabeled_includes_labeled=True with config.data.unlabeled_split of a '
        'streamed dataset: its unlabeled stream reads the unlabeled split alone; set it to False.')
  spec = dataclasses.replace(spec, num_unlabeled=num_unlabeled)
  num_train = num_labeled_rows + num_unlabeled
  num_test = tfds_builders.split_size(builder, spec.test_split)
  labels = lambda: record_streams.scan_labels(builder, spec.train_split, num_labeled_rows,
                                              label_key=spec.label_key)
  info = specs.DatasetInfo(spec.name, spec.num_classes, spec.image_shape, num_train, num_test)
  labeled = splits.load_or_draw(
      workdir, labels, dataset=spec.name, num_classes=spec.num_classes,
      num_labels=data.num_labels, label_fraction=data.label_fraction,
      seed=config.seed, num_train=num_labeled_rows, write=process_index == 0)
  if spec.mean is None:  # A TFDS dataset by name: the labeled pool's statistics.
    sample = _labeled_sample(builder, spec, labeled)
    spec = normalization.with_statistics(workdir, spec, sample, np.arange(len(sample)),
                                         write=process_index == 0)
  pools = train_pools.pools(config, num_train, labeled, uses_unlabeled, num_unlabeled)
  ds = _train_dataset(builder, spec, config, pools, augment_kind, start_step, process_index,
                      process_count, num_labeled_rows)
  host_batches = iter(tfds.as_numpy(ds))
  # The strong view draws from the unlabeled stream's augmentation seed.
  train_batch = device_input.Prefetcher(host_batches, mesh, spec=spec, start_step=start_step,
                                        size=data.prefetch_batches, strong_view=strong_view,
                                        strong_seed=train_pools.stream_seeds(
                                            config.seed, train_pools.UNLABELED_STREAM)[1])

  eval_rows = config.eval_batch_size // process_count
  share = eval_batches.share_bounds(num_test, process_index, process_count)
  size, channels = spec.image_shape[0], spec.image_shape[2]
  preprocess = lambda x: stream_augment.normalize(stream_augment.center_crop(x, size, channels),
                                                  spec.mean, spec.std)
  num_batches = eval_batches.num_eval_batches(num_test, process_count, eval_rows)
  make_eval = lambda: eval_batches.padded_batches(
      record_streams.eval_batches(builder, spec.test_split, share, eval_rows, preprocess,
                             keys=(spec.image_key, spec.label_key)),
      num_batches, eval_rows, spec.image_shape)
  unlabeled = pools['unlabeled'][0] if 'unlabeled' in pools else None
  return input_contract.Input(info=info, labeled_indices=labeled, unlabeled_indices=unlabeled,
                              train_batch=train_batch, num_eval_examples=num_test,
                              make_eval_batches=make_eval, host_batches=host_batches)
