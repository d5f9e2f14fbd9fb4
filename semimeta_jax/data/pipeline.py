"""`build_input`: the training batches and evaluation batches of a run.

Everything is checked before any data is read: the dataset name, the label
budget, and that every global batch size divides by the process count. Then
the data's presence (`DatasetNotFoundError` otherwise), the labeled split (saved
in / restored from the workdir), and the training batches:

  * in-memory datasets: the uint8 split on the devices, each global batch a
    pure function of (seed, step) computed there (`device_input.py`);
  * ImageNet: host-local uint8 record streams (`streaming.py`), prefetched to
    the devices and normalised there.

TensorFlow and TFDS are imported only to read TFDS data: a registered
in-memory dataset (`specs.register_in_memory`) runs without them.
"""

import dataclasses
import functools
import json
from typing import Callable, Iterable, Iterator, Optional

from etils import epath
import jax
import numpy as np

from semimeta_jax import errors
from semimeta_jax import parallel
from semimeta_jax import workdir_files
from semimeta_jax.data import device_input
from semimeta_jax.data import evaluation
from semimeta_jax.data import specs
from semimeta_jax.data import splits

_BATCH_FIELDS = ('labeled_batch_size', 'unlabeled_batch_size', 'eval_batch_size')


class InputConfigError(errors.UserError, ValueError):
  """A config field the input pipeline cannot use (batch share, padding, pools)."""

_LABELED, _UNLABELED = 0, 1


@dataclasses.dataclass
class Input:
  """The input side of a run.

  Attributes:
    info: the `DatasetInfo` (sizes as read).
    labeled_indices: ascending train-split indices of the labeled examples.
    unlabeled_indices: ascending train-split indices of the unlabeled pool
      (None when the method reads no unlabeled stream).
    train_batch: `train_batch(i)` is the global batch of the i-th training step
      of the run (i = 0 first; the state at step i trains on it), jax.Arrays
      sharded `P('data')`: {'labeled': {'image' float32, 'label' int32, 'index'
      int32 (train-split index)}, 'unlabeled': {...}}. In-memory data computes any i; streamed data must be
      asked for i = start_step, start_step + 1, ... in order.
    num_eval_examples: size of the evaluation split.
    make_eval_batches: returns a new iterator over this process's evaluation batches.
    host_batches: streamed data only: the host-local uint8 batches that feed
      `train_batch` (for inspection; do not consume both).
    keep_eval_on_devices: whether `global_eval_batches` keeps the evaluation
      batches on the devices after building them once (small test splits).
  """
  info: specs.DatasetInfo
  labeled_indices: np.ndarray
  unlabeled_indices: Optional[np.ndarray]
  train_batch: Callable[[int], dict]
  num_eval_examples: int
  make_eval_batches: Callable[[], Iterator[dict]]
  host_batches: Optional[Iterator[dict]] = None
  keep_eval_on_devices: bool = False
  _device_eval: Optional[list] = dataclasses.field(default=None, repr=False)

  def global_eval_batches(self, mesh) -> Iterable[dict]:
    """The evaluation batches as global arrays on `mesh` (every process's share).

    A small test split is shipped once and kept on the devices (CIFAR's: 123 MB
    float32), so an evaluation then costs the device its forward passes only.
    """
    if not self.keep_eval_on_devices:
      return (parallel.to_global(batch, mesh) for batch in self.eval_batches())
    if self._device_eval is None:
      self._device_eval = [parallel.to_global(batch, mesh) for batch in self.eval_batches()]
    return self._device_eval

  def eval_batches(self):
    """A new iterator over this process's padded evaluation batches.

    Every process yields the same number of batches of `eval_batch_size //
    process_count` rows: {'image' float32, 'label' int32, 'mask' bool}; over
    all processes each test example has exactly one True mask entry.
    """
    return self.make_eval_batches()


def dataset_info(data_config) -> specs.DatasetInfo:
  """The `DatasetInfo` of the configured dataset (TFDS metadata, or a registered spec)."""
  spec = specs.get_spec(data_config)
  if specs.registered_loader(spec.name):
    return specs.DatasetInfo(spec.name, spec.num_classes, spec.image_shape, *spec.sizes)
  from semimeta_jax.data import datasets  # pylint: disable=g-import-not-at-top
  return datasets.dataset_info(data_config)


def _check_arguments(config, mesh, process_index, process_count, start_step):
  """The arguments, and the batch sizes against the devices and processes (one rule: parallel's)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in '
                     f'[0, process_count={process_count}).')
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0.')
  parallel.check_batch_sizes({field: config[field] for field in _BATCH_FIELDS}, mesh,
                             process_count)


def _stream_seeds(seed, stream_id):
  """(order seed, augmentation seed) of a stream, independent across streams."""
  state = np.random.SeedSequence([seed % 2**32, stream_id]).generate_state(2)
  return int(state[0]), int(state[1])


def _pools(config, num_train, labeled, uses_unlabeled, num_unlabeled=0):
  """{stream: (train indices, global batch size, stream id)} of the run.

  With a truly unlabeled pool (the last `num_unlabeled` of the `num_train`
  rows, `DatasetSpec.num_unlabeled`), the unlabeled stream draws from those
  rows only (plus the labeled ones if `config.data.unlabeled_includes_labeled`).
  """
  pools = {'labeled': (labeled, config.labeled_batch_size, _LABELED)}
  if not uses_unlabeled:
    return pools
  if num_unlabeled:
    unlabeled = np.arange(num_train - num_unlabeled, num_train, dtype=np.int64)
    if config.data.unlabeled_includes_labeled:
      unlabeled = np.union1d(labeled, unlabeled)
  else:
    unlabeled = splits.unlabeled_indices(
        num_train, labeled, config.data.unlabeled_includes_labeled)
  if not unlabeled.size:
    raise InputConfigError(
        'The unlabeled pool is empty (every training example is labeled); '
        'set config.data.unlabeled_includes_labeled=True or '
        "config.method='supervised'.")
  pools['unlabeled'] = (unlabeled, config.unlabeled_batch_size, _UNLABELED)
  return pools


NORMALIZATION_FILENAME = 'normalization.json'


def normalization(workdir, spec, images, labeled, write):
  """The spec with its mean/std: registered ones, or the labeled pool's (saved in the workdir).

  A resumed run reads `<workdir>/normalization.json` back, so it normalises as
  the run started (the statistics do not move if the data on disk changes).
  """
  if spec.mean is not None and spec.std is not None:
    return spec
  path = epath.Path(workdir) / NORMALIZATION_FILENAME if workdir else None
  if path and path.exists():
    saved = workdir_files.read_json_object(path)
    mean, std = saved.get('mean'), saved.get('std')
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std)):
      raise workdir_files.WorkdirFileError(f'{path} has no per-channel mean and std; delete it (the '
                                           'labeled pool\'s are computed again) or restore it.')
  else:
    # Per-channel sums in chunks: a large labeled pool never exists whole in float64.
    total, total_sq, count = 0.0, 0.0, 0
    for start in range(0, len(labeled), 1024):
      pixels = np.asarray(images[labeled[start:start + 1024]], np.float64) / 255.0
      total = total + pixels.sum(axis=(0, 1, 2))
      total_sq = total_sq + np.square(pixels).sum(axis=(0, 1, 2))
      count += pixels[..., 0].size
    mean = total / count
    # A constant channel would divide by zero.
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    mean, std = mean.tolist(), np.maximum(std, 1e-3).tolist()
    if path and write:
      workdir_files.make_dirs(path.parent)
      workdir_files.write_atomically(path, json.dumps(
          {'dataset': spec.name, 'source': 'labeled pool', 'mean': mean, 'std': std}))
  return dataclasses.replace(spec, mean=tuple(float(m) for m in mean),
                             std=tuple(float(s) for s in std))


def _load_arrays(data_config, spec):
  """(train images, train labels, test images, test labels, spec) of an in-memory dataset.

  A TFDS unlabeled split (`spec.unlabeled_split`) is appended to the train
  rows with label -1, and the returned spec counts those rows as its truly
  unlabeled pool.
  """
  load = specs.registered_loader(spec.name)
  if load:
    return (*load(), spec)
  from semimeta_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from semimeta_jax.data import in_memory  # pylint: disable=g-import-not-at-top
  builder = datasets.get_builder(data_config)
  train_images, train_labels = in_memory.load_split(builder, spec.train_split, spec)
  if spec.unlabeled_split:
    unlabeled_images, unlabeled_labels = in_memory.load_split(
        builder, spec.unlabeled_split, spec, with_labels=False)
    train_images = np.concatenate([train_images, unlabeled_images])
    train_labels = np.concatenate([train_labels, unlabeled_labels])
    spec = dataclasses.replace(spec, num_unlabeled=len(unlabeled_labels))
  return (train_images, train_labels, *in_memory.load_split(builder, spec.test_split, spec), spec)


def build_input(config, workdir, *, start_step=0, process_index=None, process_count=None,
                mesh=None, uses_unlabeled=True):
  """Builds the training batches and evaluation batches of a run.

  Args:
    config: the run's config (see `configs/default.py`); reads
      `config.data.*`, `seed`, `method` and the three batch sizes. Optional:
      `config.data.pad_mode` ('constant' | 'reflect', default 'constant'),
      `config.data.image_size` (ImageNet crop, default 224),
      `config.data.shuffle_buffer` (ImageNet, default 16384).
    workdir: run directory for `labeled_indices.json` (and `normalization.json`
      for a dataset without registered statistics: a folder of images); None
      = not saved.
    start_step: index of the first training batch (streamed data starts there).
    process_index: this process; default `jax.process_index()`.
    process_count: number of processes; default `jax.process_count()`.
    mesh: the device mesh of the training batches; default all devices.
    uses_unlabeled: whether to build the unlabeled stream (the method's
      `uses_unlabeled`).

  Returns:
    An `Input`.

  Raises:
    InputConfigError, splits.LabelBudgetError: bad configuration (the message
      names the field).
    DatasetNotFoundError: the dataset is not prepared in the data_dir.
    splits.SplitMismatchError: the workdir's split was drawn differently.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  mesh = parallel.make_mesh() if mesh is None else mesh
  _check_arguments(config, mesh, process_index, process_count, start_step)
  data = config.data
  spec = specs.get_spec(data)
  splits.check_label_config(data.num_labels, data.label_fraction, spec.num_classes)
  augment_kind = spec.augment if data.augment else 'none'
  if not spec.in_memory:
    from semimeta_jax.data import streamed_input  # pylint: disable=g-import-not-at-top
    return streamed_input.build(config, workdir, spec, augment_kind, start_step=start_step,
                                process_index=process_index, process_count=process_count,
                                mesh=mesh,
                                pools_fn=functools.partial(_pools, uses_unlabeled=uses_unlabeled),
                                seeds_fn=_stream_seeds)

  train_images, labels, test_images, test_labels, spec = _load_arrays(data, spec)
  num_train, num_test = len(labels), len(test_labels)
  info = specs.DatasetInfo(spec.name, spec.num_classes, spec.image_shape, num_train, num_test)
  # A truly unlabeled pool is the last rows; the labels are drawn from the rows before it.
  num_labeled_rows = num_train - spec.num_unlabeled
  labeled = splits.load_or_draw(
      workdir, labels[:num_labeled_rows], dataset=spec.name, num_classes=spec.num_classes,
      num_labels=data.num_labels, label_fraction=data.label_fraction,
      seed=config.seed, num_train=num_labeled_rows, write=process_index == 0)
  spec = normalization(workdir, spec, train_images, labeled, write=process_index == 0)
  pools = _pools(config, num_train, labeled, uses_unlabeled, spec.num_unlabeled)
  # Rows of a truly unlabeled pool have no labels (-1): its batches carry none.
  streams = {name: device_input.Stream(pool, batch, *_stream_seeds(config.seed, sid),
                                       has_labels=not (name == 'unlabeled' and spec.num_unlabeled))
             for name, (pool, batch, sid) in pools.items()}
  train_batch = device_input.device_batches(
      train_images, labels, streams, mesh, spec=spec, augment_kind=augment_kind,
      pad_mode=data.pad_mode)

  eval_rows = config.eval_batch_size // process_count
  share = evaluation.share_bounds(num_test, process_index, process_count)
  images, eval_labels = test_images[share[0]:share[1]], test_labels[share[0]:share[1]]
  num_batches = evaluation.num_eval_batches(num_test, process_count, eval_rows)
  make_eval = lambda: evaluation.padded_batches(
      evaluation.array_batches(images, eval_labels, eval_rows, spec.mean, spec.std),
      num_batches, eval_rows, spec.image_shape)
  unlabeled = pools['unlabeled'][0] if 'unlabeled' in pools else None
  return Input(info=info, labeled_indices=labeled, unlabeled_indices=unlabeled,
               train_batch=train_batch, num_eval_examples=num_test,
               make_eval_batches=make_eval, keep_eval_on_devices=True)
