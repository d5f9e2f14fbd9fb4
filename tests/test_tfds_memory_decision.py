"""Where a TFDS dataset by name lives: on the devices exactly while its training bytes fit.

The limit `data.max_in_memory_gb` is in GiB (2**30 bytes) and the bytes are every
training row, the unlabeled split's included, at the model's size (uint8). The
limit is set one byte either side of that count, so that a decision in MiB, in
decimal GB, or without the unlabeled split lands on the wrong side.
"""

import tensorflow_datasets as tfds

from semimeta_jax.data import catalog
from tests.test_data_tfds_by_name import NUM_MOCK
from tests.test_data_tfds_by_name import _stl10

SIDE = 16  # _stl10 resizes to 16x16x3.


def _in_memory(limit_bytes):
  config = _stl10(max_in_memory_gb=limit_bytes / 2**30)
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    return catalog.get_spec(config.data).in_memory


def test_the_data_stays_on_the_devices_exactly_while_its_bytes_fit():
  needed = 2 * NUM_MOCK * SIDE * SIDE * 3  # The train and unlabelled splits' rows.
  assert _in_memory(needed)
  assert not _in_memory(needed - 1)


def test_a_limit_between_mib_and_gib_keeps_the_data_on_the_devices():
  needed = 2 * NUM_MOCK * SIDE * SIDE * 3
  # 1.5x the bytes in GiB is 1.5 * 2**10 times the bytes in MiB: read as MiB it would stream.
  assert _in_memory(1.5 * needed)
  # Read as decimal GB (1e9 bytes), 1.02 x needed GiB-bytes falls below the count.
  assert _in_memory(1.02 * needed)
  assert not _in_memory(0.98 * needed)
