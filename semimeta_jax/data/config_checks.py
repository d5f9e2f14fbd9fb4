"""The checks of `config.data` that need no data, with messages that name the field.

They live with the data layer so that it checks its own fields however it is
entered: `catalog.get_spec` runs them before choosing a dataset, and the run's
validation (`semimeta_jax.validation`) runs them with the other fields.
"""

import ml_collections

from semimeta_jax import errors
from semimeta_jax.data import device_augment

_require = errors.require


def _one_of(data: ml_collections.ConfigDict, field: str, choices):
  _require(data[field] in choices, 'data.' + field, data[field],
           f'expected one of {tuple(choices)}')


def validate_data_config(data: ml_collections.ConfigDict) -> None:
  """Raises `ConfigError` naming the first `config.data` field with an unusable value.

  Args:
    data: `config.data`.

  Raises:
    errors.ConfigError: a field out of its range (label budget, augmentation,
      image size, memory budget, prefetch and shuffle sizes).
  """
  _require(isinstance(data.num_labels, int) and (data.num_labels == -1 or data.num_labels > 0),
           'data.num_labels', data.num_labels, 'must be a positive integer, or -1 for every label')
  _require(isinstance(data.validation_size, int) and data.validation_size >= 0,
           'data.validation_size', data.validation_size,
           'must be an integer >= 0 (held-out examples; 0 = no validation split)')
  _require(0 <= data.label_fraction <= 1, 'data.label_fraction', data.label_fraction, 'must be in [0, 1]')
  _one_of(data, 'pad_mode', device_augment.PAD_MODES)
  _one_of(data, 'augment_kind', device_augment.KINDS)
  if data.get('randaugment') is not None:  # Configs recorded before the strong view had none.
    _check_randaugment(data.randaugment)
  _require(isinstance(data.image_size, int) and data.image_size >= 0, 'data.image_size',
           data.image_size, "must be an integer >= 0 (0 keeps a folder's or TFDS dataset's size)")
  _require(data.max_in_memory_gb >= 0, 'data.max_in_memory_gb', data.max_in_memory_gb, 'must be >= 0')
  for field in ('prefetch_batches', 'shuffle_buffer'):
    _require(isinstance(data[field], int) and data[field] > 0, 'data.' + field, data[field],
             'must be a positive integer')


def _check_randaugment(strong: ml_collections.ConfigDict) -> None:
  """The strong view's fields (`config.data.randaugment`)."""
  _require(isinstance(strong.num_ops, int) and strong.num_ops >= 0, 'data.randaugment.num_ops',
           strong.num_ops, 'must be an integer >= 0 (ops per image)')
  _require(strong.max_magnitude > 0, 'data.randaugment.max_magnitude', strong.max_magnitude, 'must be > 0')
  _require(strong.magnitude == -1 or 0 <= strong.magnitude <= strong.max_magnitude,
           'data.randaugment.magnitude', strong.magnitude,
           f'must be -1 (uniform in each range, USB) or in [0, max_magnitude={strong.max_magnitude}]')
  _require(0 <= strong.cutout <= 1, 'data.randaugment.cutout', strong.cutout,
           'must be in [0, 1] (a fraction of the image side)')
