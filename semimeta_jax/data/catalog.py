"""Which dataset a `config.data` names, and what it is: the one dispatcher over the dataset kinds.

The kinds sit below it and know nothing of each other:

  * a folder of images (`config.data.folder`, `folder.py`);
  * a built-in or registered name (`specs.builtin_spec`: digits, Fashion-MNIST, CIFAR, SVHN,
    ImageNet, arrays registered with `specs.register_in_memory`);
  * any other TFDS name (`tfds_by_name.py`).

Importing this module does not import TensorFlow: only a TFDS dataset's
metadata is read through it (`tfds_by_name.py`, `tfds_builders.py`), and
those are imported where a TFDS dataset is asked for.
"""

from semimeta_jax.data import config_checks
from semimeta_jax.data import folder
from semimeta_jax.data import specs


def get_spec(data_config) -> specs.DatasetSpec:
  """Returns the `DatasetSpec` of the configured dataset, with its image size and splits.

  Args:
    data_config: `config.data`. `folder`: a folder of images, which then
      replaces `name`. `image_size` sets ImageNet's crop size (and the resize
      of a folder or of a TFDS dataset by name). `train_split`, `test_split`,
      `unlabeled_split` ('' = the dataset's own) name TFDS splits. A name that
      is none of the built-in or registered datasets is looked up in TFDS.

  Raises:
    ConfigError: a field out of range, or a folder or TFDS dataset the
      config's fields do not fit.
    UnknownDatasetError: a name TFDS does not know either.
    folder.FolderDataError: `data_config.folder` is set and its images cannot be used.
  """
  config_checks.validate_data_config(data_config)
  if data_config.folder:
    return folder.get_spec(data_config)
  spec = specs.builtin_spec(data_config)
  if spec is not None:
    return spec
  from semimeta_jax.data import tfds_by_name  # pylint: disable=g-import-not-at-top
  return tfds_by_name.get_spec(data_config, known=specs.known_names())


def dataset_info(data_config) -> specs.DatasetInfo:
  """The `DatasetInfo` of the configured dataset.

  Cheap: a registered dataset's spec, or a TFDS dataset's metadata (`digits`
  is built on first use, offline).

  Raises:
    The errors of `get_spec`; DatasetNotFoundError: the TFDS data is not there.
  """
  spec = get_spec(data_config)
  if specs.registered_loader(spec.name):
    return specs.DatasetInfo(spec.name, spec.num_classes, spec.image_shape, *spec.sizes)
  from semimeta_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
  return tfds_builders.tfds_info(tfds_builders.get_builder(spec, data_config), spec)


def prepared_sizes(data_config):
  """(training rows, test examples, truly unlabeled rows), or None if the data is not prepared.

  The training rows count the truly unlabeled ones (a folder's unlabeled/, an
  unlabeled split), which are the last of them. Reads metadata only; unlike
  `dataset_info` it never prepares anything (not even `digits`), so a dry run
  writes nothing.
  """
  spec = get_spec(data_config)
  if specs.registered_loader(spec.name):  # Arrays in memory (a folder of images): no TFDS files.
    return (*spec.sizes, spec.num_unlabeled)
  from semimeta_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
  return tfds_builders.prepared_sizes(spec, data_config)
