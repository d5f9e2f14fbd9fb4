"""The real `digits` dataset, built offline, and its device-resident batches."""

import json

from configs import default
import jax
import numpy as np
import pytest
from sklearn import datasets as sk_datasets

from semimeta_jax import data
from semimeta_jax.data import catalog
from semimeta_jax.data import digits
from semimeta_jax.data import tfds_arrays
from semimeta_jax.data import splits



def _digits_spec():
  config = default.get_config()
  config.data.name = 'digits'
  return catalog.get_spec(config.data)


_DIGITS = _digits_spec()


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  digits.Digits(data_dir=path).download_and_prepare()
  return path


def _config(data_dir, **overrides):
  config = default.get_config()
  config.data.name = 'digits'
  config.data.data_dir = data_dir
  config.data.num_labels = 50
  config.labeled_batch_size = 16
  config.unlabeled_batch_size = 24
  config.eval_batch_size = 64
  for key, value in overrides.items():
    parent = config.data if key in config.data else config
    parent[key] = value
  return config


def _take(inp, count, start=0):
  """Global batches start, ..., start + count - 1, on the host."""
  return [jax.device_get(inp.train_batch(step)) for step in range(start, start + count)]


def test_builder_split_sizes_and_values(data_dir):
  builder = digits.Digits(data_dir=data_dir)
  train_images, train_labels = tfds_arrays.load_split(builder, 'train', _DIGITS)
  test_images, test_labels = tfds_arrays.load_split(builder, 'test', _DIGITS)
  assert train_images.shape == (digits.NUM_TRAIN, 8, 8, 1) == (1497, 8, 8, 1)
  assert test_images.shape == (digits.NUM_TEST, 8, 8, 1) == (300, 8, 8, 1)
  assert train_images.dtype == np.uint8 and train_images.max() == 255
  np.testing.assert_array_equal(np.bincount(test_labels), np.full(10, 30))
  # The stored examples are scikit-learn's, in the documented order.
  train, test = digits.split_indices()
  assert not np.intersect1d(train, test).size
  bunch = sk_datasets.load_digits()
  np.testing.assert_array_equal(train_images,
                                digits.to_uint8(bunch.images[train]))
  np.testing.assert_array_equal(test_labels, bunch.target[test])
  # Normalisation constants are this training split's statistics.
  spec = catalog.get_spec(_config(data_dir).data)
  pixels = train_images / 255.0
  assert abs(pixels.mean() - spec.mean[0]) < 1e-4
  assert abs(pixels.std() - spec.std[0]) < 1e-4


def test_builds_on_first_use(tmp_path):
  info = data.dataset_info(_config(str(tmp_path)).data)
  assert info == data.DatasetInfo('digits', 10, (8, 8, 1), 1497, 300)


def test_batches_shapes_and_split(data_dir, tmp_path):
  inp = data.build_input(_config(data_dir), str(tmp_path), process_index=0,
                         process_count=1)
  assert len(inp.labeled_indices) == 50
  train_labels = _train_labels(data_dir)
  np.testing.assert_array_equal(
      np.bincount(train_labels[inp.labeled_indices]), np.full(10, 5))
  assert not np.intersect1d(inp.labeled_indices, inp.unlabeled_indices).size
  assert len(inp.unlabeled_indices) == 1497 - 50
  batch = jax.device_get(inp.train_batch(0))
  assert batch['labeled']['image'].shape == (16, 8, 8, 1)
  assert batch['unlabeled']['image'].shape == (24, 8, 8, 1)
  for part in batch.values():
    assert part['image'].dtype == np.float32 and part['label'].dtype == np.int32
    assert -0.82 < part['image'].min() and part['image'].max() < 1.85
  saved = json.loads((tmp_path / splits.SPLIT_FILENAME).read_text())
  assert saved['indices'] == inp.labeled_indices.tolist()


def _train_labels(data_dir):
  return tfds_arrays.load_split(digits.Digits(data_dir=data_dir), 'train', _DIGITS)[1]


def test_streams_draw_from_their_pools_epoch_by_epoch(data_dir):
  config = _config(data_dir, augment=False)
  inp = data.build_input(config, None, process_index=0, process_count=1)
  images, labels = tfds_arrays.load_split(digits.Digits(data_dir=data_dir),
                                        'train', _DIGITS)
  spec = catalog.get_spec(config.data)
  normalised = ((images / 255.0 - spec.mean) / spec.std).astype(np.float32)
  # Without augmentation each image is a training image; find which one.
  flat = normalised.reshape(len(images), -1)
  seen = {'labeled': [], 'unlabeled': []}
  for batch in _take(inp, 100 // 16 + 1):
    for part, indices in seen.items():
      for image, label in zip(batch[part]['image'], batch[part]['label']):
        index = int(np.argmin(np.abs(flat - image.reshape(1, -1)).sum(1)))
        assert labels[index] == label
        indices.append(index)
  # Positions [0, 50) and [50, 100) are two different permutations of the 50
  # labeled examples (one per epoch).
  first, second = seen['labeled'][:50], seen['labeled'][50:100]
  np.testing.assert_array_equal(np.sort(first), inp.labeled_indices)
  np.testing.assert_array_equal(np.sort(second), inp.labeled_indices)
  assert first != second
  assert set(seen['unlabeled']) <= set(inp.unlabeled_indices)
  assert len(set(seen['unlabeled'])) == len(seen['unlabeled'])  # One epoch.


@pytest.mark.slow
def test_same_seed_same_batches_and_resume(data_dir):
  config = _config(data_dir)
  run = lambda start: data.build_input(config, None, start_step=start,
                                       process_index=0, process_count=1)
  first = _take(run(0), 7)
  again = _take(run(0), 7)
  resumed = _take(run(5), 2, start=5)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['unlabeled']['image'],
                                  b['unlabeled']['image'])
  for a, b in zip(first[5:], resumed):
    for part in ('labeled', 'unlabeled'):
      np.testing.assert_array_equal(a[part]['image'], b[part]['image'])
      np.testing.assert_array_equal(a[part]['label'], b[part]['label'])
  other = _take(data.build_input(_config(data_dir, seed=1), None,
                                 process_index=0, process_count=1), 1)
  assert not np.array_equal(other[0]['labeled']['image'],
                            first[0]['labeled']['image'])


@pytest.mark.slow
def test_the_global_batch_does_not_depend_on_the_process_count(data_dir):
  # Every process computes the same global batch on the devices; its own rows
  # are its addressable shards.
  config = _config(data_dir)
  whole = _take(data.build_input(config, None, start_step=3, process_index=0,
                                 process_count=1), 1, start=3)[0]
  for p in range(2):
    part = _take(data.build_input(config, None, start_step=3, process_index=p,
                                  process_count=2), 1, start=3)[0]
    jax.tree.map(np.testing.assert_array_equal, part, whole)


@pytest.mark.parametrize('process_count', [1, 3])
def test_evaluation_counts_every_example_once(data_dir, process_count):
  # 300 = 3 * 96 + 12: the last batch is partial.
  config = _config(data_dir, eval_batch_size=96, labeled_batch_size=24)
  test_images, _ = tfds_arrays.load_split(digits.Digits(data_dir=data_dir),
                                        'test', _DIGITS)
  spec = catalog.get_spec(config.data)
  reference = ((test_images / 255.0 - spec.mean) / spec.std).astype(np.float32)
  per_process = []
  for p in range(process_count):
    inp = data.build_input(config, None, process_index=p,
                           process_count=process_count)
    batches = list(inp.eval_batches())
    assert len(list(inp.eval_batches())) == len(batches)  # A fresh iterator.
    for batch in batches:
      assert batch['image'].shape == (96 // process_count, 8, 8, 1)
      assert batch['mask'].dtype == bool
    per_process.append(batches)
  assert len({len(b) for b in per_process}) == 1  # Same count everywhere.
  images = np.concatenate([b['image'][b['mask']] for bs in per_process
                           for b in bs])
  assert inp.num_eval_examples == 300
  np.testing.assert_allclose(images, reference, atol=1e-6)


def test_supervised_has_no_unlabeled_stream(data_dir):
  config = _config(data_dir, method='supervised', num_labels=-1)
  inp = data.build_input(config, None, process_index=0, process_count=1, uses_unlabeled=False)
  assert inp.unlabeled_indices is None
  assert set(inp.train_batch(0)) == {'labeled'}
  assert len(inp.labeled_indices) == 1497


def test_resume_with_other_split_settings_fails(data_dir, tmp_path):
  data.build_input(_config(data_dir), str(tmp_path), process_index=0,
                   process_count=1)
  with pytest.raises(data.SplitMismatchError, match='num_labels'):
    data.build_input(_config(data_dir, num_labels=100), str(tmp_path),
                     process_index=0, process_count=1)


@pytest.mark.parametrize('overrides,match', [
    ({'unlabeled_batch_size': 30}, 'unlabeled_batch_size=30'),
    ({'eval_batch_size': 6}, 'eval_batch_size=6'),
    ({'num_labels': 55}, 'not divisible'),
    ({'num_labels': 1500}, 'class 0 has only 148'),
    ({'name': 'no_such_dataset'}, 'Unknown dataset'),
    ({'num_labels': -1}, 'unlabeled pool is empty'),
])
def test_bad_config_is_a_clear_error(data_dir, overrides, match):
  with pytest.raises(ValueError, match=match):
    data.build_input(_config(data_dir, **overrides), None, process_index=0,
                     process_count=4)
