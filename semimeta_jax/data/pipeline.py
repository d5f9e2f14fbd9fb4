"""`build_input`: the training streams and evaluation batches of a run.

Everything is checked before any data is read: the dataset name, the label
budget, and that every global batch size divides by the process count. Then
the data's presence (`DatasetNotFoundError` otherwise), the labeled split (saved
in / restored from the workdir), and the streams, host-local and deterministic
in (seed, step). See `in_memory.py` and `streaming.py` for how batches are made.
"""

import dataclasses
from typing import Callable, Iterator, Optional

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from semimeta_jax import errors
from semimeta_jax.data import augment
from semimeta_jax.data import datasets
from semimeta_jax.data import evaluation
from semimeta_jax.data import in_memory
from semimeta_jax.data import splits
from semimeta_jax.data import streaming

class InputConfigError(errors.UserError, ValueError):
  """A config field the input pipeline cannot use (batch share, padding, pools)."""


_BATCH_FIELDS = ('labeled_batch_size', 'unlabeled_batch_size',
                 'eval_batch_size')
_LABELED, _UNLABELED = 0, 1


@dataclasses.dataclass
class Input:
  """The input side of a run.

  Attributes:
    info: the `DatasetInfo` (sizes as read).
    labeled_indices: ascending train-split indices of the labeled examples.
    unlabeled_indices: ascending train-split indices of the unlabeled pool
      (None when the method reads no unlabeled stream).
    train_batches: iterator over host-local numpy batches from the start step:
      {'labeled': {'image', 'label', 'index'}, 'unlabeled': {...}}; 'index' is
      each example's train-split index.
    num_eval_examples: size of the evaluation split.
  """
  info: datasets.DatasetInfo
  labeled_indices: np.ndarray
  unlabeled_indices: Optional[np.ndarray]
  train_batches: Iterator[dict]
  num_eval_examples: int
  make_eval_batches: Callable[[], Iterator[dict]]

  def eval_batches(self):
    """A new iterator over this process's padded evaluation batches.

    Every process yields the same number of batches of `eval_batch_size //
    process_count` rows: {'image' float32, 'label' int32, 'mask' bool}; over
    all processes each test example has exactly one True mask entry.
    """
    return self.make_eval_batches()


def _check_config(config, process_index, process_count, start_step):
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in '
                     f'[0, process_count={process_count}).')
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0.')
  for field in _BATCH_FIELDS:
    size = config[field]
    if size <= 0 or size % process_count:
      raise InputConfigError(
          f'config.{field}={size} must be a positive multiple of the process '
          f'count ({process_count}): each process takes an equal share.')
  pad_mode = config.data.get('pad_mode', 'constant')
  if pad_mode not in augment.PAD_MODES:
    raise InputConfigError(f'config.data.pad_mode={pad_mode!r} must be one of '
                     f'{sorted(augment.PAD_MODES)}.')


def _stream_seeds(seed, stream_id):
  """(order seed, augmentation seed) of a stream, independent across streams."""
  state = np.random.SeedSequence([seed % 2**32, stream_id]).generate_state(2)
  return int(state[0]), int(state[1])


def _hide_gpus_from_tensorflow():
  # The accelerators belong to JAX; TensorFlow only feeds the host.
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # Already initialised: nothing left to hide.
    pass


def build_input(config, workdir, *, start_step=0, process_index=None,
                process_count=None, uses_unlabeled=True):
  """Builds the training streams and evaluation batches of a run.

  Args:
    config: the run's config (see `configs/default.py`); reads
      `config.data.*`, `seed`, `method` and the three batch sizes. Optional:
      `config.data.pad_mode` ('constant' | 'reflect', default 'constant'),
      `config.data.image_size` (ImageNet crop, default 224),
      `config.data.shuffle_buffer` (ImageNet, default 16384).
    workdir: run directory for `labeled_indices.json`; None = not saved.
    start_step: global step of the first training batch.
    process_index: this process; default `jax.process_index()`.
    process_count: number of processes; default `jax.process_count()`.
    uses_unlabeled: whether to build the unlabeled stream (the method's
      `uses_unlabeled`).

  Returns:
    An `Input`.

  Raises:
    InputConfigError, splits.LabelBudgetError: bad configuration (message
      names the field).
    DatasetNotFoundError: the dataset is not prepared in the data_dir.
    splits.SplitMismatchError: the workdir's split was drawn differently.
  """
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  _check_config(config, process_index, process_count, start_step)
  data = config.data
  spec = datasets.get_spec(data)
  splits.check_label_config(data.num_labels, data.label_fraction,
                            spec.num_classes)
  _hide_gpus_from_tensorflow()
  builder = datasets.get_builder(data)

  if spec.in_memory:
    train_images, labels = in_memory.load_split(builder, spec.train_split)
    test_images, test_labels = in_memory.load_split(builder, spec.test_split)
    num_train, num_test = len(labels), len(test_labels)
  else:
    num_train = datasets.split_size(builder, spec.train_split)
    num_test = datasets.split_size(builder, spec.test_split)
    labels = lambda: streaming.scan_labels(builder, spec.train_split, num_train)
  info = datasets.DatasetInfo(spec.name, spec.num_classes, spec.image_shape,
                              num_train, num_test)

  labeled = splits.load_or_draw(
      workdir, labels, dataset=spec.name, num_classes=spec.num_classes,
      num_labels=data.num_labels, label_fraction=data.label_fraction,
      seed=config.seed, num_train=num_train, write=process_index == 0)
  pools = _pools(config, num_train, labeled, uses_unlabeled)

  augment_kind = spec.augment if data.augment else 'none'
  if spec.in_memory:
    streams = {
        name: in_memory.Stream(pool, batch, *_stream_seeds(config.seed, sid))
        for name, (pool, batch, sid) in pools.items()}
    ds = in_memory.train_dataset(
        train_images, labels, streams, start_step=start_step,
        process_index=process_index, process_count=process_count, spec=spec,
        augment_kind=augment_kind, pad_mode=data.get('pad_mode', 'constant'),
        prefetch=data.prefetch_batches)
  else:
    ds = _streamed_train_dataset(builder, spec, config, pools, augment_kind,
                                 start_step, process_index, process_count,
                                 num_train)

  eval_rows = config.eval_batch_size // process_count
  share = evaluation.share_bounds(num_test, process_index, process_count)
  if spec.in_memory:
    images = test_images[share[0]:share[1]]
    eval_labels = test_labels[share[0]:share[1]]
    source = lambda: evaluation.array_batches(images, eval_labels, eval_rows,
                                              spec.mean, spec.std)
  else:
    preprocess = lambda x: augment.normalize(
        augment.center_crop(x, spec.image_shape[0]), spec.mean, spec.std)
    source = lambda: streaming.eval_batches(builder, spec.test_split, share,
                                            eval_rows, preprocess)
  num_batches = evaluation.num_eval_batches(num_test, process_count, eval_rows)
  make_eval = lambda: evaluation.padded_batches(source(), num_batches,
                                                eval_rows, spec.image_shape)

  unlabeled = pools['unlabeled'][0] if 'unlabeled' in pools else None
  return Input(info=info, labeled_indices=labeled, unlabeled_indices=unlabeled,
               train_batches=iter(tfds.as_numpy(ds)),
               num_eval_examples=num_test, make_eval_batches=make_eval)


def _pools(config, num_train, labeled, uses_unlabeled):
  """{stream: (train indices, global batch size, stream id)} of the run."""
  pools = {'labeled': (labeled, config.labeled_batch_size, _LABELED)}
  if not uses_unlabeled:
    return pools
  unlabeled = splits.unlabeled_indices(
      num_train, labeled, config.data.unlabeled_includes_labeled)
  if not unlabeled.size:
    raise InputConfigError(
        'The unlabeled pool is empty (every training example is labeled); '
        'set config.data.unlabeled_includes_labeled=True or choose a method '
        'that reads no unlabeled stream.')
  pools['unlabeled'] = (unlabeled, config.unlabeled_batch_size, _UNLABELED)
  return pools


def _streamed_train_dataset(builder, spec, config, pools, augment_kind,
                            start_step, process_index, process_count,
                            num_train):
  """Zipped per-process record streams (ImageNet)."""
  size = spec.image_shape[0]
  if augment_kind == 'none':
    view = lambda x, seed: augment.center_crop(x, size)
  else:
    view = lambda x, seed: augment.random_resized_crop(x, seed, size)
  preprocess = lambda x, seed: augment.normalize(view(x, seed), spec.mean,
                                                 spec.std)
  bounds = splits.even_bounds(num_train, process_count)
  share = (int(bounds[process_index]), int(bounds[process_index + 1]))
  streams = {}
  for name, (pool, batch, stream_id) in pools.items():
    mask = np.zeros(num_train, bool)
    mask[pool] = True
    order_seed, augment_seed = _stream_seeds(config.seed, stream_id)
    streams[name] = streaming.train_dataset(
        builder, spec.train_split, mask, share,
        batch_size=batch // process_count, start_step=start_step,
        order_seed=order_seed % 2**31, augment_seed=augment_seed,
        preprocess=preprocess,
        shuffle_buffer=config.data.get('shuffle_buffer', 16384))
  return tf.data.Dataset.zip(streams).prefetch(config.data.prefetch_batches)
