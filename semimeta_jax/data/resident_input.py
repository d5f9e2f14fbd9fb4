"""The input of an in-memory dataset: the uint8 split on the devices, batches made there.

digits, CIFAR-10/100, SVHN, a folder of images, a small TFDS dataset by name
and registered arrays: the training split is read once (from TFDS, or from a
registered loader), placed on every device, and each global batch is a pure
function of (seed, step) computed there (`device_input.py`). The evaluation
split stays on the host until `Input.global_eval_batches` ships it once.
"""

import dataclasses

import numpy as np

from semimeta_jax.data import device_input
from semimeta_jax.data import eval_batches
from semimeta_jax.data import input_contract
from semimeta_jax.data import normalization
from semimeta_jax.data import specs
from semimeta_jax.data import splits
from semimeta_jax.data import train_pools
from semimeta_jax.data import validation_split


def _load_arrays(data_config, spec):
  """(train images, train labels, test images, test labels, spec) of an in-memory dataset.

  A TFDS unlabeled split (`spec.unlabeled_split`) is appended to the train
  rows with label -1, and the returned spec counts those rows as its truly
  unlabeled pool.
  """
  load = specs.registered_loader(spec.name)
  if load:
    return (*load(), spec)
  # TensorFlow only for TFDS data: a registered dataset runs without it.
  from semimeta_jax.data import tfds_arrays  # pylint: disable=g-import-not-at-top
  from semimeta_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
  builder = tfds_builders.get_builder(spec, data_config)
  train_images, train_labels = tfds_arrays.load_split(builder, spec.train_split, spec)
  if spec.unlabeled_split:
    unlabeled_images, unlabeled_labels = tfds_arrays.load_split(
        builder, spec.unlabeled_split, spec, with_labels=False)
    train_images = np.concatenate([train_images, unlabeled_images])
    train_labels = np.concatenate([train_labels, unlabeled_labels])
    spec = dataclasses.replace(spec, num_unlabeled=len(unlabeled_labels))
  return (train_images, train_labels, *tfds_arrays.load_split(builder, spec.test_split, spec),
          spec)


def build(config, workdir, spec, augment_kind, *, process_index, process_count, mesh,
          uses_unlabeled, strong_view=None) -> input_contract.Input:
  """The `Input` of an in-memory dataset (arguments as `pipeline.build_input`'s, checked there)."""
  data = config.data
  train_images, labels, test_images, test_labels, spec = _load_arrays(data, spec)
  num_train, num_test = len(labels), len(test_labels)
  info = specs.DatasetInfo(spec.name, spec.num_classes, spec.image_shape, num_train, num_test)
  # A truly unlabeled pool is the last rows; the labels are drawn from the rows before it.
  num_labeled_rows = num_train - spec.num_unlabeled
  # Checked before the labeled split is written: a size that cannot be held out writes nothing.
  validation_sizes = validation_split.per_class_sizes(
      labels[:num_labeled_rows], spec.num_classes, validation_size=data.validation_size,
      num_labels=data.num_labels, label_fraction=data.label_fraction) if data.validation_size else None
  labeled = splits.load_or_draw(
      workdir, labels[:num_labeled_rows], dataset=spec.name, num_classes=spec.num_classes,
      num_labels=data.num_labels, label_fraction=data.label_fraction,
      seed=config.seed, num_train=num_labeled_rows, write=process_index == 0)
  validation = np.zeros((0,), np.int64)
  if validation_sizes is not None:
    validation = validation_split.load_or_draw(
        workdir, labels[:num_labeled_rows], labeled, dataset=spec.name, sizes=validation_sizes,
        seed=config.seed, write=process_index == 0)
  spec = normalization.with_statistics(workdir, spec, train_images, labeled,
                                       write=process_index == 0)
  pools = train_pools.pools(config, num_train, labeled, uses_unlabeled, spec.num_unlabeled,
                            held_out=validation)
  # Rows of a truly unlabeled pool have no labels (-1): its batches carry none.
  streams = {name: device_input.Stream(pool, batch, *train_pools.stream_seeds(config.seed, sid),
                                       has_labels=not (name == 'unlabeled' and spec.num_unlabeled))
             for name, (pool, batch, sid) in pools.items()}
  train_batch = device_input.device_batches(
      train_images, labels, streams, mesh, spec=spec, augment_kind=augment_kind,
      pad_mode=data.pad_mode, strong_view=strong_view)

  eval_rows = config.eval_batch_size // process_count
  make_eval = _exact_batches(test_images, test_labels, spec, eval_rows, process_index, process_count)
  make_validation = None
  if len(validation):
    # Evaluation views (no augmentation) of the held-out training rows, counted as the test set is.
    make_validation = _exact_batches(train_images[validation], labels[validation], spec, eval_rows,
                                     process_index, process_count)
  unlabeled = pools['unlabeled'][0] if 'unlabeled' in pools else None
  return input_contract.Input(info=info, labeled_indices=labeled, unlabeled_indices=unlabeled,
                              train_batch=train_batch, num_eval_examples=num_test,
                              make_eval_batches=make_eval, keep_eval_on_devices=True,
                              validation_indices=validation,
                              make_validation_batches=make_validation)


def _exact_batches(images, labels, spec, rows, process_index, process_count):
  """`make_batches()`: this process's padded, masked batches of an evaluated split (eval_batches.py)."""
  count = len(labels)
  start, stop = eval_batches.share_bounds(count, process_index, process_count)
  images, labels = images[start:stop], labels[start:stop]
  num_batches = eval_batches.num_eval_batches(count, process_count, rows)
  return lambda: eval_batches.padded_batches(
      eval_batches.array_batches(images, labels, rows, spec.mean, spec.std),
      num_batches, rows, spec.image_shape)
