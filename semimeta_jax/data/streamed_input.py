"""The input of a streamed (record) dataset: ImageNet through tf.data.

Each process reads its share of the records (`streaming.py`), decodes and
augments on the host, and ships uint8 batches (a quarter of float32's bytes)
that `device_input.Prefetcher` copies to the devices a few steps ahead and
normalises there.
"""

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from semimeta_jax.data import augment
from semimeta_jax.data import datasets
from semimeta_jax.data import device_input
from semimeta_jax.data import evaluation
from semimeta_jax.data import pipeline
from semimeta_jax.data import splits
from semimeta_jax.data import streaming


def _hide_gpus_from_tensorflow():
  # The accelerators belong to JAX; TensorFlow only feeds the host.
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # Already initialised: nothing left to hide.
    pass


def _train_dataset(builder, spec, config, pools, augment_kind, start_step, process_index,
                   process_count, num_train, seeds_fn):
  """Zipped per-process record streams of uint8 batches."""
  size = spec.image_shape[0]
  if augment_kind == 'none':
    view = lambda x, seed: augment.center_crop(x, size)
  else:
    view = lambda x, seed: augment.random_resized_crop(x, seed, size)
  preprocess = lambda x, seed: augment.to_uint8(view(x, seed))
  bounds = splits.even_bounds(num_train, process_count)
  share = (int(bounds[process_index]), int(bounds[process_index + 1]))
  streams = {}
  for name, (pool, batch, stream_id) in pools.items():
    mask = np.zeros(num_train, bool)
    mask[pool] = True
    order_seed, augment_seed = seeds_fn(config.seed, stream_id)
    streams[name] = streaming.train_dataset(
        builder, spec.train_split, mask, share,
        batch_size=batch // process_count, start_step=start_step,
        order_seed=order_seed % 2**31, augment_seed=augment_seed,
        preprocess=preprocess,
        shuffle_buffer=config.data.get('shuffle_buffer', 16384))
  return tf.data.Dataset.zip(streams).prefetch(config.data.prefetch_batches)


def build(config, workdir, spec, augment_kind, *, start_step, process_index, process_count, mesh,
          pools_fn, seeds_fn):
  """The `pipeline.Input` of a streamed dataset (see `pipeline.build_input`)."""
  data = config.data
  _hide_gpus_from_tensorflow()
  builder = datasets.get_builder(data)
  num_train = datasets.split_size(builder, spec.train_split)
  num_test = datasets.split_size(builder, spec.test_split)
  labels = lambda: streaming.scan_labels(builder, spec.train_split, num_train)
  info = datasets.DatasetInfo(spec.name, spec.num_classes, spec.image_shape, num_train, num_test)
  labeled = splits.load_or_draw(
      workdir, labels, dataset=spec.name, num_classes=spec.num_classes,
      num_labels=data.num_labels, label_fraction=data.label_fraction,
      seed=config.seed, num_train=num_train, write=process_index == 0)
  pools = pools_fn(config, num_train, labeled)
  ds = _train_dataset(builder, spec, config, pools, augment_kind, start_step, process_index,
                      process_count, num_train, seeds_fn)
  host_batches = iter(tfds.as_numpy(ds))
  train_batch = device_input.Prefetcher(host_batches, mesh, spec=spec, start_step=start_step,
                                        size=data.prefetch_batches)

  eval_rows = config.eval_batch_size // process_count
  share = evaluation.share_bounds(num_test, process_index, process_count)
  preprocess = lambda x: augment.normalize(
      augment.center_crop(x, spec.image_shape[0]), spec.mean, spec.std)
  num_batches = evaluation.num_eval_batches(num_test, process_count, eval_rows)
  make_eval = lambda: evaluation.padded_batches(
      streaming.eval_batches(builder, spec.test_split, share, eval_rows, preprocess),
      num_batches, eval_rows, spec.image_shape)
  unlabeled = pools['unlabeled'][0] if 'unlabeled' in pools else None
  return pipeline.Input(info=info, labeled_indices=labeled, unlabeled_indices=unlabeled,
                        train_batch=train_batch, num_eval_examples=num_test,
                        make_eval_batches=make_eval, host_batches=host_batches)
