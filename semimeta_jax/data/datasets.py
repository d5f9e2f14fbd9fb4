"""Getting a dataset's TFDS builder (the specs themselves are in `specs.py`).

Every dataset is read through TFDS from `config.data.data_dir`. Nothing is
downloaded unless `config.data.download=True`; when the prepared files are not
there, `get_builder` raises `DatasetNotFoundError` before any compute, naming
the dataset, where it looked and the commands that prepare it. `digits` is the
exception: it ships with scikit-learn and is built offline on first use.
"""

import contextlib
import io
import os

from absl import logging
from etils import epath
import tensorflow_datasets as tfds

from semimeta_jax import errors
from semimeta_jax.data import digits
from semimeta_jax.data import specs

NAMES = specs.TFDS_NAMES
ALIASES = specs.ALIASES
DatasetInfo = specs.DatasetInfo
DatasetNotFoundError = specs.DatasetNotFoundError
UnknownDatasetError = specs.UnknownDatasetError
DatasetSpec = specs.DatasetSpec
get_spec = specs.get_spec
IMAGENET_MANUAL_FILES = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')


def _data_dir(data_config):
  return os.path.expanduser(data_config.data_dir) if data_config.data_dir else None


def _builder(spec, data_config):
  """The TFDS builder of `spec` in the configured data_dir (nothing is read or prepared)."""
  data_dir = _data_dir(data_config)
  if spec.name == 'digits':
    return digits.Digits(data_dir=data_dir)
  return tfds.builder(spec.name, data_dir=data_dir)


def _is_prepared(builder, spec):
  # `as_dataset` is what reading does and is lazy, so probing it is cheap; it
  # also holds under `tfds.testing.mock_data`, where `is_prepared()` is False.
  try:
    builder.as_dataset(split=spec.test_split)
  except AssertionError:  # TFDS's "could not find data in ..." error.
    return False
  return True


def _instructions(spec, builder):
  root = builder.data_dir_root
  if spec.name == 'imagenet2012':
    manual = os.path.join(root, 'downloads', 'manual')
    return ('TFDS cannot download ImageNet: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar '
            f'(image-net.org, needs an account) in {manual}/ and run '
            f'`tfds build imagenet2012 --data_dir={root}`.')
  return (f'Prepare it with `tfds build {spec.name} --data_dir={root}` on a machine with internet '
          f'access (then copy {os.path.join(root, spec.name)} here), or rerun with '
          '--config.data.download=True.')


def not_found_error(spec, builder, reason):
  """Returns the `DatasetNotFoundError` for `spec`: what, where, and the fix, in three lines."""
  return DatasetNotFoundError(
      f'dataset {spec.name!r} (TFDS {spec.name}:{builder.version}) is not available: {reason}\n'
      f'Looked in {builder.data_dir} (config.data.data_dir={builder.data_dir_root}).\n'
      + _instructions(spec, builder))


def _prepare(spec, builder):
  """Runs TFDS's download-and-prepare (ImageNet: its manual files first)."""
  if spec.name == 'digits':
    logging.info('Preparing the digits dataset from the copy bundled with scikit-learn (no '
                 'download) into %s.', builder.data_dir)
    # TFDS announces a "download" and draws progress bars on stdout; nothing is
    # downloaded and the build takes a second.
    tfds.disable_progress_bar()
    with contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare()
    return
  if spec.name == 'imagenet2012':
    manual = epath.Path(builder.data_dir_root) / 'downloads' / 'manual'
    missing = [f for f in IMAGENET_MANUAL_FILES if not (manual / f).exists()]
    if missing:
      raise not_found_error(
          spec, builder, f'it is not prepared and {", ".join(missing)} '
          f'missing from {manual}.')
  builder.download_and_prepare()


def get_builder(data_config):
  """Returns the TFDS builder of the configured dataset, its data present.

  `digits` is built into the data_dir if absent (offline, seconds). Another
  dataset is prepared by TFDS only when `data_config.download` is True.

  Args:
    data_config: `config.data` (`name`, `data_dir`, `download`).

  Raises:
    ValueError: unknown dataset name.
    DatasetNotFoundError: the data is not prepared and may not be downloaded.
  """
  spec = get_spec(data_config)
  builder = _builder(spec, data_config)
  check_splits(builder, spec)  # Prepared data has split metadata; before TFDS's own ValueError.
  if _is_prepared(builder, spec):
    return builder
  if spec.name == 'digits' or data_config.download:
    _prepare(spec, builder)
    return builder
  raise not_found_error(
      spec, builder,
      'it is not prepared there and config.data.download=False.')


def check_splits(builder, spec):
  """A configured split the prepared dataset does not have: one error naming the field.

  Split expressions ('train[:90%]', 'train+extra') are checked by their split names.
  """
  available = sorted(builder.info.splits.keys()) if builder.info.splits else None
  if not available:  # Metadata without splits (mock data): TFDS itself will say.
    return
  for field, expression in (('train_split', spec.train_split), ('test_split', spec.test_split),
                            ('unlabeled_split', spec.unlabeled_split)):
    for part in filter(None, expression.split('+')):
      name = part.split('[')[0].strip()
      if name not in available:
        raise errors.ConfigError(
            f'config.data.{field}={expression!r}: {spec.name!r} has no split {name!r}; its '
            f'splits are {available}.')


def split_size(builder, split):
  """Number of examples in `split`, from the TFDS metadata when it has them.

  Data whose metadata lacks split sizes (as under `tfds.testing.mock_data`) is
  counted by reading its labels.
  """
  if builder.info.splits:
    return builder.info.splits[split].num_examples
  # Reading one small feature: the image and label keys vary, the count does not.
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()}
                          if 'image' in builder.info.features else None)
  return int(ds.reduce(0, lambda n, _: n + 1))


def train_rows(builder, spec):
  """Rows of the training data: the train split's, then the unlabeled split's if any."""
  rows = split_size(builder, spec.train_split)
  if spec.unlabeled_split:
    rows += split_size(builder, spec.unlabeled_split)
  return rows


def dataset_info(data_config):
  """Returns the `DatasetInfo` of the configured dataset.

  Cheap: reads TFDS metadata only (and builds `digits` on first use).

  Args:
    data_config: `config.data`.

  Raises:
    ValueError: unknown dataset name.
    DatasetNotFoundError: the data is not there (see `get_builder`).
  """
  spec = get_spec(data_config)
  builder = get_builder(data_config)
  return DatasetInfo(
      name=spec.name, num_classes=spec.num_classes,
      image_shape=spec.image_shape,
      num_train=train_rows(builder, spec),
      num_test=split_size(builder, spec.test_split))


def prepared_sizes(data_config):
  """(training rows, test examples, truly unlabeled rows), or None if the data is not prepared.

  The training rows count the truly unlabeled ones (a folder's unlabeled/, an
  unlabeled split), which are the last of them. Reads TFDS metadata only;
  unlike `dataset_info` it never prepares anything (not even `digits`), so a
  dry run writes nothing.
  """
  spec = get_spec(data_config)
  if specs.registered_loader(spec.name):  # Arrays in memory (a folder of images): no TFDS files.
    return (*spec.sizes, spec.num_unlabeled)
  builder = _builder(spec, data_config)
  check_splits(builder, spec)
  if not _is_prepared(builder, spec):
    return None
  num_unlabeled = split_size(builder, spec.unlabeled_split) if spec.unlabeled_split else 0
  return train_rows(builder, spec), split_size(builder, spec.test_split), num_unlabeled
