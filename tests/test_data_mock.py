"""CIFAR, SVHN and ImageNet pipelines on `tfds.testing.mock_data`."""

import re

from configs import default
import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from semimeta_jax import data
from semimeta_jax import parallel
from semimeta_jax.data import catalog

NUM_MOCK = 48
# The batches of 8 and 12 rows divide over four devices.
_MESH4 = lambda: parallel.make_mesh(jax.devices()[:4])


def _config(name, **overrides):
  config = default.get_config()
  config.data.name = name
  config.data.num_labels = -1
  config.data.label_fraction = 0.5
  config.data.image_size = 16  # ImageNet crops; small keeps tests fast.
  config.labeled_batch_size = 8
  config.unlabeled_batch_size = 12
  config.eval_batch_size = 20
  for key, value in overrides.items():
    parent = config.data if key in config.data else config
    parent[key] = value
  return config


def _assert_normalised(images, spec):
  low = -np.asarray(spec.mean) / np.asarray(spec.std)
  high = (1 - np.asarray(spec.mean)) / np.asarray(spec.std)
  assert images.dtype == np.float32
  assert np.all(images >= low - 1e-5) and np.all(images <= high + 1e-5)
  assert images.std() > 0.1  # Not blank.


@pytest.mark.parametrize('name,shape', [
    ('cifar10', (32, 32, 3)), ('cifar100', (32, 32, 3)),
    ('svhn_cropped', (32, 32, 3))])
def test_in_memory_datasets_under_mock_data(name, shape):
  config = _config(name)
  spec = catalog.get_spec(config.data)
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    inp = data.build_input(config, None, start_step=2, process_index=1,
                           process_count=2, mesh=_MESH4())
    batch = jax.device_get(inp.train_batch(2))  # The global batch, on the devices.
    evals = list(inp.eval_batches())
  assert inp.info.image_shape == shape and inp.info.num_train == NUM_MOCK
  for part, size in (('labeled', 8), ('unlabeled', 12)):
    assert batch[part]['image'].shape == (size, *shape)
    assert batch[part]['label'].dtype == np.int32
    assert np.all((0 <= batch[part]['label'])
                  & (batch[part]['label'] < spec.num_classes))
    _assert_normalised(batch[part]['image'], spec)
  # Process 1 of 2 holds test examples [24, 48): three batches of 10 rows.
  assert [int(b['mask'].sum()) for b in evals] == [10, 10, 4]
  assert evals[0]['image'].shape == (10, *shape)


# A fake imagenet2012 whose record i is a constant 20x24 JPEG of value 4i + 2
# with label i % 10, served by absolute slices ('train[a:b]') as TFDS does.
_FAKE_SIZES = {'train': 60, 'validation': 37}
_SPLIT = re.compile(r'^(\w+)(?:\[(\d*):(\d*)\])?$')


def _fake_imagenet_as_dataset(self, split, decoders=None, **unused_kwargs):
  del self, unused_kwargs
  name, start, stop = _SPLIT.match(str(split)).groups()
  indices = np.arange(int(start or 0), int(stop or _FAKE_SIZES[name]))
  labels = tf.constant(indices % 10, tf.int64)
  if isinstance(decoders, tfds.decode.PartialDecoding):
    return tf.data.Dataset.from_tensor_slices({'label': labels})
  images = [tf.io.encode_jpeg(tf.fill((20, 24, 3), tf.constant(4 * i + 2,
                                                               tf.uint8)),
                              quality=100) for i in indices]
  return tf.data.Dataset.from_tensor_slices(
      {'image': tf.stack(images), 'label': labels})


def _indices(images, spec=None):
  """Record index of each (constant) fake image, from its mean pixel (uint8, or normalised)."""
  pixels = images if spec is None else (images * np.asarray(spec.std) + np.asarray(spec.mean)) * 255
  values = pixels.astype(np.float64).mean(axis=(1, 2, 3))
  return np.round((values - 2) / 4).astype(int)


@pytest.fixture(scope='module')
def imagenet():
  """Process inputs of the fake ImageNet, 2 processes, keyed by start step."""
  config = _config('imagenet2012')
  spec = catalog.get_spec(config.data)
  with tfds.testing.mock_data(as_dataset_fn=_fake_imagenet_as_dataset):
    build = lambda p, start=0: data.build_input(
        config, None, start_step=start, process_index=p, process_count=2, mesh=_MESH4())
    inputs = {(p, 0): build(p) for p in range(2)}
    inputs[(0, 5)] = build(0, start=5)
    yield spec, inputs


def test_imagenet_shapes_labels_and_shares(imagenet):
  spec, inputs = imagenet
  assert inputs[(0, 0)].info == data.DatasetInfo('imagenet2012', 1000,
                                                 (16, 16, 3), 60, 37)
  labeled = set(inputs[(0, 0)].labeled_indices)
  assert len(labeled) == 30  # Half of each class.
  shares = {0: set(range(30)), 1: set(range(30, 60))}
  for p in range(2):
    seen = {'labeled': [], 'unlabeled': []}
    for _ in range(6):
      batch = next(inputs[(p, 0)].host_batches)  # This process's uint8 rows.
      for part, indices in seen.items():
        assert batch[part]['image'].shape == ({'labeled': 4, 'unlabeled': 6}[
            part], 16, 16, 3)
        assert batch[part]['image'].dtype == np.uint8
        index = _indices(batch[part]['image'])
        np.testing.assert_array_equal(batch[part]['label'], index % 10)
        indices.extend(index)
    # Each process reads only its own share; an epoch covers it once.
    own_labeled = sorted(shares[p] & labeled)
    assert sorted(seen['labeled'][:len(own_labeled)]) == own_labeled
    own_unlabeled = sorted(shares[p] - labeled)
    assert sorted(seen['unlabeled'][:len(own_unlabeled)]) == own_unlabeled
    assert set(seen['labeled']) == set(own_labeled)


def test_imagenet_resume_gives_the_same_batches(imagenet):
  spec, inputs = imagenet
  del spec
  with tfds.testing.mock_data(as_dataset_fn=_fake_imagenet_as_dataset):
    config = _config('imagenet2012')
    fresh = data.build_input(config, None, process_index=0, process_count=2,
                             mesh=_MESH4())
    uninterrupted = [next(fresh.host_batches) for _ in range(7)]
  resumed = [next(inputs[(0, 5)].host_batches) for _ in range(2)]
  for a, b in zip(uninterrupted[5:], resumed):
    for part in ('labeled', 'unlabeled'):
      np.testing.assert_array_equal(a[part]['image'], b[part]['image'])
      np.testing.assert_array_equal(a[part]['label'], b[part]['label'])


def test_imagenet_batches_reach_the_devices_normalised_in_order():
  config = _config('imagenet2012')
  spec = catalog.get_spec(config.data)
  with tfds.testing.mock_data(as_dataset_fn=_fake_imagenet_as_dataset):
    build = lambda: data.build_input(config, None, start_step=3, process_index=0,
                                     process_count=1, mesh=_MESH4())
    host, device = build(), build()
    expected = [next(host.host_batches) for _ in range(3)]
    got = [jax.device_get(device.train_batch(step)) for step in (3, 4, 5)]
    with pytest.raises(ValueError, match='sequential'):
      device.train_batch(7)
  for want, have in zip(expected, got):
    for part in ('labeled', 'unlabeled'):
      _assert_normalised(have[part]['image'], spec)
      reference = (want[part]['image'] / np.float32(255) - np.float32(spec.mean)) / np.float32(spec.std)
      np.testing.assert_allclose(have[part]['image'], reference, atol=1e-6)
      np.testing.assert_array_equal(have[part]['label'], want[part]['label'])


def test_imagenet_evaluation_counts_every_example_once(imagenet):
  spec, inputs = imagenet
  with tfds.testing.mock_data(as_dataset_fn=_fake_imagenet_as_dataset):
    per_process = [list(inputs[(p, 0)].eval_batches()) for p in range(2)]
  assert len(per_process[0]) == len(per_process[1]) == 2  # 19 and 18 of 10.
  seen = []
  for batches in per_process:
    for batch in batches:
      assert batch['image'].shape == (10, 16, 16, 3)
      index = _indices(batch['image'][batch['mask']], spec)
      np.testing.assert_array_equal(batch['label'][batch['mask']], index % 10)
      seen.extend(index)
  assert sorted(seen) == list(range(37))
  assert inputs[(0, 0)].num_eval_examples == 37
