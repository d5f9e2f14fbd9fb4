"""An image folder's labels and size: a class missing from test/ keeps every other label,
and the on-device decision counts every training image at its decoded size."""

import numpy as np
from PIL import Image
import pytest

from semimeta_jax.data import catalog
from semimeta_jax.data import folder
from semimeta_jax.data import specs
from tests.conftest import tiny_config

CLASSES = ('ant', 'bee', 'cat', 'dog', 'eel')
SIDE = 4


def _shade(label):
  """The grey level every pixel of an image of class `label` has: its class can be read back."""
  return 40 * (label + 1)


def _write(root, split, name, count):
  directory = root / split / name
  directory.mkdir(parents=True, exist_ok=True)
  label = CLASSES.index(name) if name in CLASSES else -1
  for i in range(count):
    shade = _shade(label) if label >= 0 else 3 + i
    Image.fromarray(np.full((SIDE, SIDE), shade, np.uint8), mode='L').save(directory / f'{i}.png')


def _config(root, **overrides):
  return tiny_config(**{'data.folder': str(root), 'data.name': 'folder', 'data.image_size': 0,
                        'data.num_labels': -1, **overrides})


@pytest.mark.parametrize('missing', [('ant',), ('cat',), ('ant', 'dog'), ('eel',)])
def test_a_class_missing_from_test_keeps_every_other_label(tmp_path, missing):
  root = tmp_path / 'data'
  for i, name in enumerate(CLASSES):
    _write(root, 'train', name, 2 + i)  # Unequal counts: a shifted label cannot hide in them.
    if name not in missing:
      _write(root, 'test', name, 3)
  spec = catalog.get_spec(_config(root).data)
  assert spec.num_classes == len(CLASSES)  # The class list is train/'s, whatever test/ lacks.
  train_images, train_labels, test_images, test_labels = specs.registered_loader('folder')()
  for images, labels, present in ((train_images, train_labels, CLASSES),
                                  (test_images, test_labels, [c for c in CLASSES if c not in missing])):
    expected = np.asarray([_shade(label) for label in labels])
    np.testing.assert_array_equal(images[:, 0, 0, 0], expected)  # Each image carries its own label.
    assert sorted(set(labels.tolist())) == sorted(CLASSES.index(c) for c in present)


def _fits(root, limit_bytes):
  """Whether the folder is accepted under a limit of `limit_bytes`, given in GiB as the config has it."""
  folder._CACHE.clear()  # pylint: disable=protected-access
  try:
    catalog.get_spec(_config(root, **{'data.max_in_memory_gb': limit_bytes / 2**30}).data)
  except folder.FolderDataError as e:
    assert 'not streamed' in str(e)
    return False
  return True


def test_the_size_limit_is_in_gib_and_counts_every_training_image_as_rgb(tmp_path):
  root = tmp_path / 'data'
  for name in CLASSES[:2]:
    _write(root, 'train', name, 3)
    _write(root, 'test', name, 1)
  _write(root, 'unlabeled', 'any', 4)
  # 6 labeled + 4 unlabeled images of 4x4, counted as RGB: 480 bytes.
  needed = (6 + 4) * SIDE * SIDE * 3
  assert _fits(root, needed)
  assert not _fits(root, needed - 1)
