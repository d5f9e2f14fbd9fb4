"""Preparing any dataset a config can name, once, into a TFDS data_dir: `python -m semimeta_jax.prepare`.

The built-in datasets (digits, fashion_mnist, cifar10, cifar100, svhn_cropped,
stl10, imagenet2012 and their aliases) and any TFDS name are prepared by their
TFDS builder: downloaded where there is a network, or from the files in
`manual_dir` (named as the dataset's downloads: cifar-10-binary.tar.gz, ...),
their registered checksums checked. `digits` needs nothing (scikit-learn ships
it); `fashion_mnist` is read from the original idx files in `source_dir`
when they are there (`fashion_mnist.py`).
"""

import ml_collections

from semimeta_jax import errors
from semimeta_jax.data import catalog
from semimeta_jax.data import specs
from semimeta_jax.data import tfds_builders


def data_config(name, data_dir, source_dir=None) -> ml_collections.ConfigDict:
  """The `config.data` fields that name a dataset and where it goes, the others at their defaults."""
  # The defaults of configs/default.py that `catalog.get_spec` reads; configs/ is not imported
  # from the library.
  return ml_collections.ConfigDict({
      'name': name, 'data_dir': data_dir, 'source_dir': source_dir or '', 'download': True,
      'folder': None, 'num_labels': -1, 'validation_size': 0, 'label_fraction': 0.0,
      'pad_mode': 'constant', 'augment_kind': 'pad_crop', 'image_size': 0,
      'max_in_memory_gb': float('inf'), 'prefetch_batches': 1, 'shuffle_buffer': 1,
      'image_key': 'image', 'label_key': 'label', 'train_split': '', 'test_split': '',
      'unlabeled_split': ''})


def prepare(name, data_dir, *, manual_dir=None, source_dir=None) -> dict[str, int]:
  """Prepares dataset `name` into `data_dir` (nothing is done where it is already prepared).

  Args:
    name: a built-in dataset's name or alias, or any TFDS name.
    data_dir: the TFDS data_dir that runs then read (`--config.data.data_dir`).
    manual_dir: a folder holding the dataset's files, downloaded by hand; None
      downloads whatever is not already in `data_dir/downloads`.
    source_dir: fashion_mnist's idx files (default: where the Debian package
      dataset-fashion-mnist puts them).

  Returns:
    {split name: number of examples} of the prepared dataset.

  Raises:
    errors.UserError: an unknown name, no network, missing or wrong files.
  """
  if specs.ALIASES.get(name, name) == 'fashion_mnist' and manual_dir and not source_dir:
    # Its files are the idx files, checked by their decompressed contents, not TFDS's downloads.
    source_dir, manual_dir = manual_dir, None
  config = data_config(name, data_dir, source_dir)
  # An image size for the datasets whose size is a choice (ImageNet's crops); none is resized here.
  config.image_size = 224 if specs.ALIASES.get(name, name) == 'imagenet2012' else 0
  try:
    spec = catalog.get_spec(config)
  except errors.ConfigError:  # Images of varying size by TFDS name: the size matters to runs only.
    config.image_size = 32
    spec = catalog.get_spec(config)
  if specs.registered_loader(spec.name):
    raise errors.UserError(f'{name!r} is held in memory by this process, not prepared into a data_dir.')
  builder = tfds_builders.prepare(spec, config, manual_dir)
  return {split: info.num_examples for split, info in sorted(builder.info.splits.items())}
