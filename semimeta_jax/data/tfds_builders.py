"""Reading a TFDS dataset: its builder, its presence, its preparation, its split sizes.

Shared by both TFDS kinds of dataset (the built-in specs of `specs.py` and any
TFDS name, `tfds_by_name.py`); which kind a config names is `catalog.py`'s
choice, made before anything here is called. Every TFDS dataset is read from
`config.data.data_dir`. Nothing is
downloaded unless `config.data.download=True`; when the prepared files are not
there, `get_builder` raises `DatasetNotFoundError` before any compute, naming
the dataset, where it looked and the command that prepares it
(`python -m semimeta_jax.prepare`, which calls `prepare` here). The exceptions
are built offline on first use: `digits` (it ships with scikit-learn) and
`fashion_mnist` when its idx files are on this machine (`fashion_mnist.py`).
"""

import contextlib
import fcntl
import io
import os

from absl import logging
from etils import epath
import tensorflow_datasets as tfds

from semimeta_jax import errors
from semimeta_jax.data import digits
from semimeta_jax.data import fashion_mnist
from semimeta_jax.data import specs
from semimeta_jax.data import tfds_prepare

IMAGENET_MANUAL_FILES = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')


def data_dir(data_config):
  """`config.data.data_dir` with `~` expanded; None for TFDS's default."""
  return os.path.expanduser(data_config.data_dir) if data_config.data_dir else None


def _builder(spec, data_config):
  """The TFDS builder of `spec` in the configured data_dir (nothing is read or prepared)."""
  directory = data_dir(data_config)
  if spec.name == 'digits':
    return digits.Digits(data_dir=directory)
  if spec.name == 'fashion_mnist':
    return fashion_mnist.FashionMnistIdx(data_dir=directory,
                                         source_dir=data_config.get('source_dir') or None)
  return tfds.builder(spec.name, data_dir=directory)


def _from_local_files(spec, builder) -> bool:
  """Whether the dataset is prepared from files on this machine, without a download.

  digits always (scikit-learn ships it); fashion_mnist when its idx files are in
  its source_dir (read and checked here, before anything is written).
  """
  if spec.name == 'fashion_mnist':
    return builder.check_sources()
  return spec.name == 'digits'


def is_prepared(builder, split):
  """Whether `split` of the builder's dataset can be read (its files are there)."""
  # `as_dataset` is what reading does and is lazy, so probing it is cheap; it
  # also holds under `tfds.testing.mock_data`, where `is_prepared()` is False.
  try:
    builder.as_dataset(split=split)
  except AssertionError:  # TFDS's "could not find data in ..." error.
    return False
  return True


def _instructions(spec, builder):
  root = builder.data_dir_root
  command = f'python -m semimeta_jax.prepare {spec.name} --data_dir={root}'
  if spec.name == 'imagenet2012':
    manual = os.path.join(root, 'downloads', 'manual')
    return ('TFDS cannot download ImageNet: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar '
            f'(image-net.org, needs an account) in {manual}/ (or a folder given as --manual_dir) and '
            f'run `{command}`.')
  return (f'Prepare it with `{command}` (downloads it; --manual_dir=DIR takes its files from DIR '
          f'instead), or rerun with --config.data.download=True.')


def not_found_error(spec, builder, reason):
  """Returns the `DatasetNotFoundError` for `spec`: what, where, and the fix, in three lines."""
  return specs.DatasetNotFoundError(
      f'dataset {spec.name!r} (TFDS {spec.name}:{builder.version}) is not available: {reason}\n'
      f'Looked in {builder.data_dir} (config.data.data_dir={builder.data_dir_root}).\n'
      + _instructions(spec, builder))


@contextlib.contextmanager
def _preparation_lock(builder):
  """Holds `<data_dir>/<dataset>.prepare.lock` (flock) while one process prepares the dataset.

  Two runs started together on a data_dir without the dataset would both build it, and
  TFDS's final rename of the second fails ("Destination ... already exists"). A remote
  data_dir (gs://...) has no file locks and is prepared unguarded.
  """
  root = os.fspath(builder.data_dir_root)
  if '://' in root:
    yield
    return
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, f'{builder.name}.prepare.lock'), 'a', encoding='utf-8') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Released by the kernel however the holder ends.
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _prepare(spec, builder, data_config, manual_dir=None):
  """Prepares the dataset in the builder's data_dir, one process at a time; returns the builder.

  A process that waited for another's preparation finds the dataset there and reads it with a
  new builder (the one it had was made before the files existed and knows no splits).
  """
  with _preparation_lock(builder):
    fresh = _builder(spec, data_config)
    if is_prepared(fresh, spec.test_split):
      return fresh
    _prepare_unguarded(spec, builder, manual_dir)
    return builder


def _prepare_unguarded(spec, builder, manual_dir=None):
  """Prepares the dataset in the builder's data_dir (ImageNet: its manual files checked first)."""
  if _from_local_files(spec, builder):
    logging.info('Preparing the %s dataset from files on this machine (no download) into %s.',
                 spec.name, builder.data_dir)
    # TFDS announces a "download" and draws progress bars on stdout; nothing is
    # downloaded and the build takes seconds.
    tfds.disable_progress_bar()
    tfds_prepare.require_builder_packages()
    with contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare()
    return
  if spec.name == 'imagenet2012':
    manual = epath.Path(manual_dir or epath.Path(builder.data_dir_root) / 'downloads' / 'manual')
    missing = [f for f in IMAGENET_MANUAL_FILES if not (manual / f).exists()]
    if missing:
      raise specs.DatasetNotFoundError(
          f'imagenet2012 is not prepared in {builder.data_dir_root} and TFDS cannot download it: '
          f'{" and ".join(missing)} missing from {manual}/ (image-net.org, needs an account); put '
          f'them there (or in a folder given as --manual_dir) and run `python -m '
          f'semimeta_jax.prepare imagenet2012 --data_dir={builder.data_dir_root}`.')
  tfds_prepare.download_and_prepare(builder, manual_dir=manual_dir)


def prepare(spec, data_config, manual_dir=None):
  """Prepares a TFDS dataset into `data_config.data_dir` (nothing is done if it is there).

  Args:
    spec: the dataset's `DatasetSpec` (`catalog.get_spec`).
    data_config: `config.data` (`data_dir`).
    manual_dir: a folder of the dataset's files, downloaded by hand; None
      downloads what is missing.

  Returns:
    The prepared builder.

  Raises:
    DatasetNotFoundError: ImageNet's archives are missing.
    tfds_prepare.PreparationError: no network, or missing or wrong files.
  """
  builder = _builder(spec, data_config)
  if not is_prepared(builder, spec.test_split):
    builder = _prepare(spec, builder, data_config, manual_dir)
  return builder


def get_builder(spec, data_config):
  """Returns the TFDS builder of a TFDS dataset, its data present.

  `digits`, and `fashion_mnist` when its idx files are in `data_config.source_dir`,
  are built into the data_dir if absent (offline, seconds). Another dataset is
  prepared by TFDS only when `data_config.download` is True.

  Args:
    spec: the dataset's `DatasetSpec` (`catalog.get_spec`).
    data_config: `config.data` (`data_dir`, `download`).

  Raises:
    ConfigError: a configured split the dataset does not have.
    DatasetNotFoundError: the data is not prepared and may not be downloaded.
  """
  builder = _builder(spec, data_config)
  check_splits(builder, spec)  # Prepared data has split metadata; before TFDS's own ValueError.
  if is_prepared(builder, spec.test_split):
    return builder
  if data_config.download or _from_local_files(spec, builder):
    return _prepare(spec, builder, data_config)
  if spec.name == 'fashion_mnist':
    raise specs.DatasetNotFoundError(fashion_mnist.not_found_message(
        builder.data_dir_root, fashion_mnist.source_dir_of(data_config)))
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


def tfds_info(builder, spec) -> specs.DatasetInfo:
  """The `DatasetInfo` of a TFDS dataset (its metadata; `digits` counted as built)."""
  return specs.DatasetInfo(
      name=spec.name, num_classes=spec.num_classes, image_shape=spec.image_shape,
      num_train=train_rows(builder, spec), num_test=split_size(builder, spec.test_split))


def prepared_sizes(spec, data_config):
  """(training rows, test examples, truly unlabeled rows) of a TFDS dataset, or None if not prepared.

  Reads TFDS metadata only and never prepares anything (not even `digits`).
  """
  builder = _builder(spec, data_config)
  check_splits(builder, spec)
  if not is_prepared(builder, spec.test_split):
    return None
  num_unlabeled = split_size(builder, spec.unlabeled_split) if spec.unlabeled_split else 0
  return train_rows(builder, spec), split_size(builder, spec.test_split), num_unlabeled
