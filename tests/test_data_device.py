"""Device-resident batches against a NumPy re-implementation of the sampling and augmentation spec.

The reference takes the same random draws (the spec's jax.random calls) and does
the rest (epochs, gather, pad, crop, flip, normalisation) in NumPy.
"""

import functools

from configs import default
import jax
import numpy as np
import pytest

from semimeta_jax import parallel
from semimeta_jax.data import device_augment
from semimeta_jax.data import pipeline
from semimeta_jax.data import synthetic

SHAPE = (6, 5, 2)  # Non-square, so a transposed crop or flip would show.
NUM_TRAIN = 37


def _register(name, augment, pad):
  return synthetic.register(name, num_train=NUM_TRAIN, num_test=11, image_shape=SHAPE,
                            num_classes=4, augment=augment, pad=pad, seed=3)


def _config(name, **overrides):
  config = default.get_config()
  config.data.name = name
  config.data.num_labels = 4  # A labeled pool (4) smaller than its batch (8).
  config.labeled_batch_size = 8
  config.unlabeled_batch_size = 16
  config.eval_batch_size = 8
  config.seed = 5
  config.num_train_steps = 100
  for key, value in overrides.items():
    parent = config.data if key in config.data else config
    parent[key] = value
  return config


def _stream_seeds(seed, stream_id):
  """The spec: SeedSequence([seed, stream id]) -> (order seed, augmentation seed)."""
  state = np.random.SeedSequence([seed, stream_id]).generate_state(2)
  return int(state[0]), int(state[1])


def reference_batch(images, labels, pool, step, batch, seeds, *, kind, pad, pad_mode, mean, std):
  """NumPy: the global batch at `step` of a stream, from the spec."""
  order_seed, augment_seed = seeds
  n = len(pool)
  positions = step * batch + np.arange(batch)
  perm = functools.lru_cache(None)(lambda e: np.asarray(
      jax.random.permutation(jax.random.fold_in(jax.random.key(order_seed), e), n)))
  index = np.array([pool[perm(p // n)[p % n]] for p in positions])
  out = images[index]
  if kind != 'none':
    crop_key, flip_key = jax.random.split(jax.random.fold_in(jax.random.key(augment_seed), step))
    offsets = np.asarray(jax.random.randint(crop_key, (batch, 2), 0, 2 * pad + 1))
    flips = np.asarray(jax.random.bernoulli(flip_key, 0.5, (batch,)))
    mode = {'constant': dict(mode='constant', constant_values=0), 'reflect': dict(mode='reflect')}
    padded = np.pad(out, ((0, 0), (pad, pad), (pad, pad), (0, 0)), **mode[pad_mode])
    height, width = out.shape[1:3]
    out = np.stack([padded[i, y:y + height, x:x + width] for i, (y, x) in enumerate(offsets)])
    if kind == 'pad_crop_flip':
      out = np.where(flips[:, None, None, None], out[:, :, ::-1], out)
  normalised = (out.astype(np.float32) / np.float32(255) - np.float32(mean)) / np.float32(std)
  return normalised, labels[index]


@pytest.mark.parametrize('augment,pad,pad_mode', [
    ('pad_crop_flip', 2, 'constant'), ('pad_crop_flip', 2, 'reflect'), ('pad_crop', 1, 'constant'),
    ('none', 0, 'constant')])
def test_batches_equal_the_numpy_reference(augment, pad, pad_mode):
  name = f'device_test_{augment}_{pad_mode}'
  spec = _register(name, augment, pad)
  config = _config(name, pad_mode=pad_mode)
  inp = pipeline.build_input(config, None)
  images, labels, _, _ = synthetic.make_arrays(NUM_TRAIN, 11, SHAPE, 4, seed=3)
  pools = {'labeled': (inp.labeled_indices, 8, 0), 'unlabeled': (inp.unlabeled_indices, 16, 1)}
  assert len(inp.labeled_indices) == 4 and len(inp.unlabeled_indices) == NUM_TRAIN - 4
  for step in (0, 1, 2, 7):  # Step 2 of the unlabeled stream spans epochs 0 and 1.
    batch = jax.device_get(inp.train_batch(step))
    for stream, (pool, size, stream_id) in pools.items():
      image, label = reference_batch(
          images, labels, pool, step, size, _stream_seeds(config.seed, stream_id), kind=augment,
          pad=pad, pad_mode=pad_mode, mean=spec.mean, std=spec.std)
      np.testing.assert_allclose(batch[stream]['image'], image, rtol=0, atol=1e-6)
      np.testing.assert_array_equal(batch[stream]['label'], label)
      assert batch[stream]['image'].dtype == np.float32 and batch[stream]['label'].dtype == np.int32


def test_streams_cover_their_pool_once_per_epoch():
  _register('device_test_epochs', 'none', 0)
  inp = pipeline.build_input(_config('device_test_epochs'), None)
  images, _, _, _ = synthetic.make_arrays(NUM_TRAIN, 11, SHAPE, 4, seed=3)
  flat = images.reshape(NUM_TRAIN, -1).astype(np.float32)
  seen = {'labeled': [], 'unlabeled': []}
  for step in range(6):
    batch = jax.device_get(inp.train_batch(step))
    for stream, found in seen.items():
      pixels = (batch[stream]['image'] * 0.25 + 0.5) * 255  # Undo the 2-channel normalisation.
      found += [int(np.argmin(np.abs(flat - row.reshape(1, -1)).sum(1))) for row in pixels]
  labeled, unlabeled = seen['labeled'], seen['unlabeled']
  for epoch in range(len(labeled) // 4):  # Pool of 4 in batches of 8: two epochs a step.
    assert sorted(labeled[4 * epoch:4 * epoch + 4]) == inp.labeled_indices.tolist()
  n = len(inp.unlabeled_indices)
  assert sorted(unlabeled[:n]) == inp.unlabeled_indices.tolist()
  assert unlabeled[:16] != unlabeled[n:n + 16]  # Each epoch has its own order.


@pytest.mark.slow
def test_the_batch_is_the_same_on_one_and_eight_devices_and_on_resume():
  _register('device_test_mesh', 'pad_crop_flip', 2)
  config = _config('device_test_mesh')
  mesh = parallel.make_mesh()
  one = pipeline.build_input(config, None, mesh=parallel.make_mesh(jax.devices()[:1]))
  eight = pipeline.build_input(config, None, mesh=mesh)
  resumed = pipeline.build_input(config, None, start_step=5, mesh=mesh)
  assert len(jax.devices()) == 8
  for step in (0, 5, 6):
    batch_one, batch_eight = one.train_batch(step), eight.train_batch(step)
    assert batch_eight['unlabeled']['image'].sharding == parallel.batch_sharded(mesh)
    assert len(batch_eight['unlabeled']['image'].addressable_shards) == 8
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(batch_one),
                 jax.device_get(batch_eight))
  # A resumed run computes batch k directly, without the batches before it.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.train_batch(5)),
               jax.device_get(eight.train_batch(5)))
  other_seed = pipeline.build_input(_config('device_test_mesh', seed=6), None)
  assert not np.array_equal(other_seed.train_batch(0)['unlabeled']['image'],
                            eight.train_batch(0)['unlabeled']['image'])


def test_flip_mirrors_the_width_axis():
  images = np.arange(2 * 3 * 4 * 1, dtype=np.uint8).reshape(2, 3, 4, 1)
  out = np.asarray(device_augment.flip_left_right(images, np.array([True, False])))
  np.testing.assert_array_equal(out[0], images[0, :, ::-1])
  np.testing.assert_array_equal(out[1], images[1])


def test_constant_pad_is_zero_and_reflect_mirrors_without_repeating_the_edge():
  image = np.arange(1, 17, dtype=np.uint8).reshape(1, 4, 4, 1) * 10
  corner = np.array([[0, 0]], np.int32)
  constant = np.asarray(device_augment.pad_and_crop(image, corner, 2, 'constant'))[0, ..., 0]
  np.testing.assert_array_equal(constant[:2], 0)
  np.testing.assert_array_equal(constant[:, :2], 0)
  np.testing.assert_array_equal(constant[2:, 2:], image[0, :2, :2, 0])
  reflect = np.asarray(device_augment.pad_and_crop(image, corner, 2, 'reflect'))[0, ..., 0]
  # Row -1 is row 1 and row -2 is row 2 (the edge row 0 is not repeated).
  np.testing.assert_array_equal(reflect[2:, 2:], image[0, :2, :2, 0])
  np.testing.assert_array_equal(reflect[0, 2:], image[0, 2, :2, 0])
  np.testing.assert_array_equal(reflect[1, 2:], image[0, 1, :2, 0])
  np.testing.assert_array_equal(reflect[2:, 0], image[0, :2, 2, 0])
  centre = np.asarray(device_augment.pad_and_crop(image, np.array([[2, 2]], np.int32), 2))
  np.testing.assert_array_equal(centre, image)  # The corner (pad, pad) is the identity.


def test_draws_cover_every_offset_in_both_axes_and_flip_half():
  offsets, flips = jax.device_get(device_augment.draws(jax.random.key(0), 20000, 4))
  for axis in range(2):
    counts = np.bincount(offsets[:, axis], minlength=9)
    assert len(counts) == 9 and counts.min() > 0.8 * 20000 / 9  # Uniform over [0, 8].
  assert np.corrcoef(offsets[:, 0], offsets[:, 1])[0, 1] < 0.05  # Independent axes.
  assert 0.48 < flips.mean() < 0.52
