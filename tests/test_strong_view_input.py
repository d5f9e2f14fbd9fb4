"""The strong view in the batch contract: built only when asked, from (seed, step), shard-independent."""

from configs import default
import jax
import numpy as np
import pytest

from semimeta_jax import parallel
from semimeta_jax.data import device_augment
from semimeta_jax.data import pipeline
from semimeta_jax.data import randaugment
from semimeta_jax.data import strong_view
from semimeta_jax.data import synthetic

SHAPE = (12, 12, 3)


def _config(name, **overrides):
  config = default.get_config()
  config.data.name = name
  config.data.num_labels = 8
  config.labeled_batch_size = 8
  config.unlabeled_batch_size = 16
  config.eval_batch_size = 8
  config.seed = 3
  config.num_train_steps = 100
  for key, value in overrides.items():
    config.data.randaugment[key] = value
  return config


def _register(name):
  return synthetic.register(name, num_train=40, num_test=8, image_shape=SHAPE, num_classes=4,
                            augment='pad_crop_flip', pad=2, seed=1)


@pytest.mark.slow  # Compiles RandAugment into the batch function.
def test_the_strong_view_is_built_only_when_asked_and_leaves_the_weak_view_as_it_was():
  _register('strong_view_asked')
  config = _config('strong_view_asked')
  mesh = parallel.make_mesh(jax.devices()[:1])
  plain = pipeline.build_input(config, None, mesh=mesh).train_batch(4)
  strong = pipeline.build_input(config, None, mesh=mesh, strong_view=True).train_batch(4)
  assert 'strong_image' not in plain['unlabeled'] and 'strong_image' not in strong['labeled']
  # The weak view's draws are untouched: runs of the other methods stay bit-identical.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(plain),
               jax.device_get({k: {f: v for f, v in part.items() if f != 'strong_image'}
                               for k, part in strong.items()}))
  weak, heavy = (np.asarray(strong['unlabeled'][k]) for k in ('image', 'strong_image'))
  assert heavy.shape == weak.shape and heavy.dtype == np.float32
  assert not np.array_equal(weak, heavy)
  # Each row is its own draw: no two rows of the batch share the view's difference to the weak one.
  differences = (heavy - weak).reshape(len(weak), -1)
  assert len({row.tobytes() for row in differences}) == len(weak)


@pytest.mark.slow  # Compiles RandAugment into the batch function.
def test_the_strong_view_is_randaugment_of_the_row_with_its_own_crop_from_the_step_key():
  """Restated from the parts: gather, crop/flip from the view's tag, RandAugment, normalise."""
  spec = _register('strong_view_restated')
  config = _config('strong_view_restated', magnitude=12.0, num_ops=2, cutout=0.25)
  inp = pipeline.build_input(config, None, mesh=parallel.make_mesh(jax.devices()[:1]),
                             strong_view=True)
  batch = inp.train_batch(7)
  images = synthetic.make_arrays(40, 8, SHAPE, 4, seed=1)[0][np.asarray(batch['unlabeled']['index'])]
  # The unlabeled stream (id 1) draws its augmentation from SeedSequence([seed, 1]).
  augment_seed = int(np.random.SeedSequence([config.seed, 1]).generate_state(2)[1])
  key = jax.random.fold_in(jax.random.key(augment_seed), 7)
  tagged = jax.random.fold_in(key, strong_view.STRONG_VIEW_TAG)
  crop_key, policy_key = jax.random.split(tagged)
  cropped = device_augment.augment(images, crop_key, 'pad_crop_flip', 2)
  expected = randaugment.strong_view(cropped, policy_key, num_ops=2, magnitude=12.0, cutout=0.25)
  np.testing.assert_array_equal(np.asarray(batch['unlabeled']['strong_image']),
                                np.asarray(device_augment.normalize(expected, spec.mean, spec.std)))


@pytest.mark.slow
def test_the_strong_view_is_the_same_on_one_and_eight_devices_and_on_resume():
  _register('strong_view_mesh')
  config = _config('strong_view_mesh')
  one = pipeline.build_input(config, None, mesh=parallel.make_mesh(jax.devices()[:1]),
                             strong_view=True)
  mesh = parallel.make_mesh()
  eight = pipeline.build_input(config, None, mesh=mesh, strong_view=True)
  assert len(jax.devices()) == 8
  for step in (0, 3):
    batch_one, batch_eight = one.train_batch(step), eight.train_batch(step)
    assert len(batch_eight['unlabeled']['strong_image'].addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(batch_one['unlabeled']['strong_image']),
                                  np.asarray(batch_eight['unlabeled']['strong_image']))
  np.testing.assert_array_equal(np.asarray(one.train_batch(3)['unlabeled']['strong_image']),
                                np.asarray(one.train_batch(3)['unlabeled']['strong_image']))
  assert not np.array_equal(np.asarray(one.train_batch(3)['unlabeled']['strong_image']),
                            np.asarray(one.train_batch(4)['unlabeled']['strong_image']))


def test_a_bad_randaugment_field_is_named():
  from semimeta_jax import errors  # pylint: disable=g-import-not-at-top
  from semimeta_jax.data import config_checks  # pylint: disable=g-import-not-at-top
  for field, value in (('magnitude', 31.0), ('num_ops', -1), ('cutout', 1.5)):
    config = _config('unused', **{field: value})
    with pytest.raises(errors.ConfigError, match=f'data.randaugment.{field}'):
      config_checks.validate_data_config(config.data)
