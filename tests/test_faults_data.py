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


# --- 16-bit images: scaled to 8 bits (value >> 8), never clipped at 255.


def _save(path, pixels, mode):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  path.parent.mkdir(parents=True, exist_ok=True)
  if mode == 'L':
    Image.fromarray(pixels.astype(np.uint8), mode='L').save(path)
  elif mode == 'F':
    Image.fromarray(pixels.astype(np.float32), mode='F').save(path)
  elif mode == 'I':
    Image.fromarray(pixels.astype(np.int32), mode='I').save(path)
  else:  # I;16 (little-endian) or I;16B (big-endian).
    dtype = '<u2' if mode == 'I;16' else '>u2'
    Image.frombytes(mode, pixels.shape[::-1], pixels.astype(dtype).tobytes()).save(path)


def _pixels(i):
  """A 4x4 8-bit pattern per image, spanning 0..255."""
  return (np.arange(16).reshape(4, 4) * 17 + i) % 256


def _folder(root, mode_of):
  """train/{a,b}/ and test/{a,b}/, two images each; `mode_of(split, label, i)` picks the storage."""
  for split in ('train', 'test'):
    for label in ('a', 'b'):
      for i in range(2):
        pixels = _pixels(i + 2 * (label == 'b') + 4 * (split == 'test'))
        mode = mode_of(split, label, i)
        stored = pixels if mode == 'L' else pixels * 257  # The same picture in 16 bits.
        _save(root / split / label / f'{i}.{"tif" if mode == "I;16B" else "png"}', stored, mode)
  return root


def _load(root):
  folder._CACHE.clear()  # pylint: disable=protected-access
  config = type('DataConfig', (), {'folder': str(root), 'image_size': 0, 'max_in_memory_gb': 1.0})
  return folder.load(config)


@pytest.mark.parametrize('mode', ['I;16', 'I;16B'])
def test_a_16_bit_folder_loads_as_its_8_bit_copy(tmp_path, mode):
  eight = _load(_folder(tmp_path / 'eight', lambda *_: 'L'))
  sixteen = _load(_folder(tmp_path / 'sixteen', lambda *_: mode))
  assert sixteen.train_images.shape == eight.train_images.shape == (4, 4, 4, 1)
  np.testing.assert_array_equal(sixteen.train_images, eight.train_images)
  np.testing.assert_array_equal(sixteen.test_images, eight.test_images)
  assert (eight.train_images == 255).mean() < 0.1  # Not saturated (PIL's convert('L') clips).


def test_one_16_bit_image_among_8_bit_ones_is_scaled_the_same_way(tmp_path):
  eight = _load(_folder(tmp_path / 'eight', lambda *_: 'L'))
  mixed = _load(_folder(tmp_path / 'mixed',
                        lambda split, label, i: 'I;16' if (split, label, i) == ('train', 'b', 1) else 'L'))
  np.testing.assert_array_equal(mixed.train_images, eight.train_images)
  np.testing.assert_array_equal(mixed.test_images, eight.test_images)


def test_16_bit_values_keep_their_high_byte(tmp_path):
  root = _folder(tmp_path / 'data', lambda *_: 'L')
  values = np.array([[0, 255, 256, 511], [32767, 32768, 65279, 65280], [65535, 1000, 40000, 60000],
                     [7, 70, 700, 7000]])
  _save(root / 'train' / 'a' / '0.png', values, 'I;16')
  loaded = _load(root)
  np.testing.assert_array_equal(loaded.train_images[0, ..., 0], values >> 8)


@pytest.mark.parametrize('mode', ['F', 'I'])
def test_32_bit_images_have_no_known_range_and_are_refused_naming_the_file(tmp_path, mode):
  root = _folder(tmp_path / 'data', lambda *_: 'L')
  _save(root / 'train' / 'b' / 'wide.tif', _pixels(0) * 1000, mode)
  with pytest.raises(folder.FolderDataError) as error:
    _load(root)
  message = str(error.value)
  assert '\n' not in message and 'train/b/wide.tif' in message and '32-bit' in message, message
