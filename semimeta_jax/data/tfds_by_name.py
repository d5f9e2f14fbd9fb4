"""Any TFDS image-classification dataset, by its TFDS name (`config.data.name=beans`).

The spec is read from the builder's feature description (no data is read):
the class count from the `ClassLabel` feature `data.label_key`, the channels
and stored size from the `Image` feature `data.image_key`. Images are resized
to `data.image_size` x `data.image_size` when that differs from their stored
size (0 keeps it, which then must be fixed). The normalisation statistics are
the labeled pool's, computed when the run starts and saved in the workdir.

Where the data lives is decided by its size: training images (uint8, the
unlabeled split's included) of at most `data.max_in_memory_gb` are kept on
every device and batched there, with `data.augment_kind`; a larger dataset is
streamed from its records with ImageNet's random-resized crops
(`streamed_input.py`). Nobody has to say which.
"""

import dataclasses
import difflib

import tensorflow_datasets as tfds

from semimeta_jax import errors
from semimeta_jax.data import specs
from semimeta_jax.data import tfds_builders


def builder(data_config):
  """The TFDS builder of `data_config.name` in the configured data_dir.

  Raises:
    UnknownDatasetError: TFDS knows no dataset of that name.
  """
  try:
    return tfds.builder(data_config.name, data_dir=tfds_builders.data_dir(data_config))
  except tfds.core.registered.DatasetNotFoundError:
    # TFDS's own builders: listing the community ones reads a registry on Google Cloud Storage
    # (a network round trip, and a credentials warning on the terminal where there is none).
    close = difflib.get_close_matches(
        data_config.name, tfds.list_builders(with_community_datasets=False), n=3)
    hint = f' Did you mean {" or ".join(map(repr, close))}?' if close else ''
    raise specs.UnknownDatasetError(
        f'Unknown dataset config.data.name={data_config.name!r}: neither one of this '
        f'project\'s datasets nor a TFDS dataset.{hint}') from None


def _feature(features, key, kind, field):
  if key not in features:
    raise errors.ConfigError(
        f'config.data.{field}={key!r}: the dataset has no such feature; it has '
        f'{sorted(features.keys())}.')
  feature = features[key]
  if not isinstance(feature, kind):
    raise errors.ConfigError(
        f'config.data.{field}={key!r} is a {type(feature).__name__}, not a TFDS '
        f'{kind.__name__}: this is not an image-classification dataset, or name the right feature.')
  return feature


def train_bytes(dataset_builder, spec) -> int | None:
  """uint8 bytes of the training images (and unlabeled ones) at the model's size; None if unknown."""
  tfds_builders.check_splits(dataset_builder, spec)
  if not tfds_builders.is_prepared(dataset_builder, spec.train_split):
    return None  # The data's absence is reported where it is read (tfds_builders.get_builder).
  rows = tfds_builders.train_rows(dataset_builder, spec)
  height, width, channels = spec.image_shape
  return rows * height * width * channels


def get_spec(data_config, known=()) -> specs.DatasetSpec:
  """The `DatasetSpec` of a TFDS dataset this project has no spec of.

  Args:
    data_config: `config.data` (`name`, `data_dir`, `image_key`, `label_key`,
      the split names, `image_size`, `augment_kind`, `max_in_memory_gb`).
    known: this project's own dataset names, for the error message.

  Raises:
    UnknownDatasetError: TFDS does not know the name either.
    ConfigError: the features or the image size do not fit.
  """
  try:
    dataset_builder = builder(data_config)
  except specs.UnknownDatasetError as e:
    raise specs.UnknownDatasetError(f'{e} This project\'s own: {list(known)}.') from None
  features = dataset_builder.info.features
  image = _feature(features, data_config.image_key, tfds.features.Image, 'image_key')
  label = _feature(features, data_config.label_key, tfds.features.ClassLabel, 'label_key')
  stored_height, stored_width, channels = image.shape
  size = int(data_config.image_size)
  if size:
    shape = (size, size, channels)
  elif stored_height is None or stored_width is None:
    raise errors.ConfigError(
        f'config.data.image_size=0 keeps the images\' size, but {data_config.name!r} images vary '
        'in size; set config.data.image_size to the side the model should see.')
  else:
    shape = (stored_height, stored_width, channels)
  if channels is None:
    raise errors.ConfigError(f'{data_config.name!r} images have no fixed channel count.')
  spec = specs.DatasetSpec(
      data_config.name, 'train', 'test', label.num_classes, shape,
      mean=None, std=None,  # The labeled pool's (pipeline.build_input).
      augment=data_config.augment_kind, pad=max(1, min(shape[:2]) // 8), in_memory=True,
      sizes=(0, 0), resize=shape[:2] != (stored_height, stored_width),
      jpeg=image.encoding_format == 'jpeg')
  spec = specs.with_configured_splits(spec, data_config)
  num_bytes = train_bytes(dataset_builder, spec)
  if num_bytes is not None and num_bytes > data_config.max_in_memory_gb * 2**30:
    # Too large for the devices: read from the records, as ImageNet.
    spec = dataclasses.replace(spec, in_memory=False, augment='random_resized_crop', pad=0)
  return spec
