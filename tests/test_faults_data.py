"""Data a careless user hands over: a damaged normalization.json, 16-bit images in a folder."""

import json

import numpy as np
import pytest

from semimeta_jax import errors
from semimeta_jax.data import folder
from semimeta_jax.data import normalization
from semimeta_jax.data import specs

# --- normalization.json: one line naming the file and the bad value, before training.


def _spec(channels):
  return specs.DatasetSpec('folder', 'train', 'test', 2, (4, 4, channels), mean=None, std=None,
                           augment='pad_crop', pad=1, in_memory=True, sizes=(2, 0))


def _statistics(workdir, channels=1):
  images = np.arange(2 * 4 * 4 * channels, dtype=np.uint8).reshape(2, 4, 4, channels)
  return normalization.with_statistics(str(workdir), _spec(channels), images, np.arange(2),
                                       write=True)


@pytest.mark.parametrize('saved, channels, named', [
    ('{"mean": ["a"], "std": ["b"]}', 1, "'a'"),
    ('{"mean": [0.1, 0.2, 0.3], "std": [0.2, 0.2, 0.2]}', 1, '3 value(s)'),
    ('{"mean": [0.1], "std": [0.2]}', 3, '1 value(s)'),
    ('{"mean": [NaN], "std": [0.2]}', 1, 'nan'),
    ('{"mean": [0.1], "std": [0.0]}', 1, '0.0'),
    ('{"mean": [0.1], "std": [-0.5]}', 1, '-0.5'),
    ('{"mean": [0.1], "std": [Infinity]}', 1, 'inf'),
    ('{"mean": [true], "std": [0.2]}', 1, 'True'),
    ('{"mean": 0.1, "std": 0.2}', 1, 'lists'),
])
def test_a_damaged_normalization_file_is_one_line_naming_it_and_the_value(tmp_path, saved,
                                                                          channels, named):
  path = tmp_path / normalization.NORMALIZATION_FILENAME
  path.write_text(saved)
  with pytest.raises(errors.UserError) as error:
    _statistics(tmp_path, channels)
  message = str(error.value)
  assert '\n' not in message and str(path) in message and named in message, message
  assert path.read_text() == saved  # Nothing already written is lost.


def test_a_sound_normalization_file_is_read_back(tmp_path):
  (tmp_path / normalization.NORMALIZATION_FILENAME).write_text(
      json.dumps({'mean': [0.5, 0.25, 1], 'std': [0.25, 0.5, 2]}))
  spec = _statistics(tmp_path, channels=3)
  assert spec.mean == (0.5, 0.25, 1.0) and spec.std == (0.25, 0.5, 2.0)
