"""Tests for semimeta_jax.models: sizes, train/eval behaviour, dropout, precision, init."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from semimeta_jax import errors
from semimeta_jax import models
from semimeta_jax.models import layers


def _key(seed):
  # The tests run the models eagerly, one small compilation per operation and shape, and
  # RBG keys compile several times faster than threefry ones on CPU.
  return jax.random.key(seed, impl='rbg')


KEYS = {'params': _key(0), 'dropout': _key(1)}

# (model, width, input shape): tiny instances for the behaviour tests. The tests reuse these
# widths and shapes so that eager operations compiled once are reused.
TINY = {
    'convlarge': (4, (4, 16, 16, 3)),
    'convlarge_digits': (4, (4, 8, 8, 1)),
    'resnet18': (4, (4, 32, 32, 3)),
    'resnet50': (2, (4, 32, 32, 3)),
    'wrn28_2': (4, (4, 8, 8, 3)),
}
# The quick tier runs the behaviour tests on the smallest model; the others are slow-tier cases.
QUICK_MODEL = 'convlarge_digits'
TINY_CASES = [name if name == QUICK_MODEL else pytest.param(name, marks=pytest.mark.slow)
              for name in sorted(TINY)]


def _model(name, width=0, num_classes=10, **overrides):
  config = default.get_config()
  config.model = name
  config.model_width = width
  config.update(overrides)
  return models.get_model(config, num_classes)


def _images(shape, seed=0):
  return jax.random.normal(_key(seed), shape)


@functools.cache
def _tiny(name, **overrides):
  """A tiny instance of `name`, its input batch and its initial variables (computed once)."""
  width, shape = TINY[name]
  model = _model(name, width=width, **overrides)
  x = _images(shape)
  return model, x, model.init(KEYS, x, train=False)


def _abstract_init(model, shape):
  """Variables' shapes and dtypes without computing anything."""
  init = functools.partial(model.init, train=False, capture_intermediates=True)
  return jax.eval_shape(init, KEYS, jax.ShapeDtypeStruct(shape, jnp.float32))


def _num_params(variables):
  return sum(x.size for x in jax.tree.leaves(variables['params']))


@pytest.mark.parametrize('name,num_classes,expected', [
    ('convlarge', 10, 3_121_802),
    ('resnet18', 1000, 11_689_512),
    ('resnet50', 1000, 25_557_032),
    ('wrn28_2', 10, 1_467_610),
])
def test_parameter_count_matches_reference(name, num_classes, expected):
  size = 224 if name.startswith('resnet') else 32
  variables = _abstract_init(_model(name, num_classes=num_classes), (1, size, size, 3))
  assert _num_params(variables) == expected


def test_model_width_scales_channels():
  variables = _abstract_init(_model('convlarge', width=8), (1, 32, 32, 3))
  convs = sorted((k for k in variables['params'] if k.startswith('Conv_')), key=lambda k: int(k[5:]))
  widths = [variables['params'][k]['kernel'].shape[-1] for k in convs]
  assert widths == [8, 8, 8, 16, 16, 16, 32, 16, 8]

  params = _abstract_init(_model('resnet18', width=8), (1, 64, 64, 3))['params']
  assert params['stem_conv']['kernel'].shape == (7, 7, 3, 8)
  assert params['layer4_1']['Conv_1']['kernel'].shape[-1] == 64

  params = _abstract_init(_model('wrn28_2', width=8), (1, 32, 32, 3))['params']
  assert params['stem_conv']['kernel'].shape[-1] == 16
  assert [params[f'group{g}_0']['Conv_1']['kernel'].shape[-1] for g in (1, 2, 3)] == [8, 16, 32]


def test_feature_map_sizes_follow_the_references():
  # ConvLarge: 32 -> 16 -> 8, then the VALID 3x3 conv gives 6x6.
  inter = _abstract_init(_model('convlarge'), (1, 32, 32, 3))['intermediates']
  assert inter['Conv_6']['__call__'][0].shape == (1, 6, 6, 512)
  # Digits: 8 -> 4 -> 2, and the SAME conv keeps 2x2.
  inter = _abstract_init(_model('convlarge_digits'), (1, 8, 8, 1))['intermediates']
  assert inter['Conv_6']['__call__'][0].shape == (1, 2, 2, 128)
  # torchvision ResNet-18 at 224: 112 after the stem, 56 after the pool, 7 at the end.
  inter = _abstract_init(_model('resnet18', width=8), (1, 224, 224, 3))['intermediates']
  assert inter['stem_conv']['__call__'][0].shape == (1, 112, 112, 8)
  assert inter['layer1_0']['__call__'][0].shape == (1, 56, 56, 8)
  assert inter['layer4_1']['__call__'][0].shape == (1, 7, 7, 64)


def test_unknown_model_lists_registered_names():
  with pytest.raises(ValueError) as error:
    _model('vgg16')
  for name in models.MODEL_NAMES:
    assert name in str(error.value)
  assert set(models.MODEL_NAMES) == {
      'convlarge', 'convlarge_digits', 'resnet18', 'resnet50', 'wrn28_2'}


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(TINY))
def test_pooled_features_come_from_the_same_forward_and_feed_the_head(name):
  model, x, variables = _tiny(name)
  logits, sown = model.apply(variables, x, train=False, mutable=['intermediates'])
  features = layers.pooled_features(sown['intermediates'])
  np.testing.assert_array_equal(logits, model.apply(variables, x, train=False))
  # The head is one dense layer on exactly these features.
  head = variables['params']['head']['fc']
  np.testing.assert_allclose(features @ head['kernel'] + head['bias'], logits, rtol=1e-5, atol=1e-5)
  assert features.shape == (x.shape[0], head['kernel'].shape[0])


@pytest.mark.parametrize('name', TINY_CASES)
def test_train_and_eval_modes(name):
  model, x, variables = _tiny(name)
  assert set(variables) == {'params', 'batch_stats'}

  logits = model.apply(variables, x, train=False)
  assert logits.shape == (x.shape[0], 10) and logits.dtype == jnp.float32
  again, updates = model.apply(variables, x, train=False, mutable=['batch_stats'])
  np.testing.assert_array_equal(logits, again)
  jax.tree.map(np.testing.assert_array_equal, updates['batch_stats'], variables['batch_stats'])

  train_logits, updates = model.apply(
      variables, x, train=True, rngs={'dropout': _key(2)}, mutable=['batch_stats'])
  assert train_logits.shape == (x.shape[0], 10) and train_logits.dtype == jnp.float32
  # Every batch-norm layer moved its running averages, so none of them was left in eval mode.
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), updates['batch_stats'],
                         variables['batch_stats'])
  assert all(jax.tree.leaves(changed))


def test_dropout_follows_the_dropout_key():
  model, x, variables = _tiny('convlarge')
  assert model.dropout_rate == 0.5

  def train_logits(model, seed):
    return model.apply(variables, x, train=True, rngs={'dropout': _key(seed)},
                       mutable=['batch_stats'])[0]

  np.testing.assert_array_equal(train_logits(model, 3), train_logits(model, 3))
  assert np.max(np.abs(train_logits(model, 3) - train_logits(model, 4))) > 1e-4

  no_dropout = model.clone(dropout_rate=0.0)
  np.testing.assert_array_equal(train_logits(no_dropout, 3), train_logits(no_dropout, 4))


def test_channel_dropout_zeroes_whole_feature_maps():
  model, x, variables = _tiny('convlarge')
  _, state = model.apply(variables, x, train=True, rngs={'dropout': _key(5)},
                         mutable=['batch_stats', 'intermediates'], capture_intermediates=True)
  for layer in ('Dropout_0', 'Dropout_1'):
    maps = np.asarray(state['intermediates'][layer]['__call__'][0])
    zero_fraction = np.mean(maps == 0, axis=(1, 2))  # per (example, channel)
    assert np.all((zero_fraction == 0) | (zero_fraction == 1)), layer
    assert 0 < np.mean(zero_fraction) < 1, layer


def test_batch_norm_uses_pytorch_momentum_and_epsilon():
  model, x, variables = _tiny('convlarge')
  _, state = model.apply(variables, x, train=True, rngs={'dropout': _key(0)},
                         mutable=['batch_stats', 'intermediates'], capture_intermediates=True)
  conv_out = np.asarray(state['intermediates']['Conv_0']['__call__'][0], np.float64)
  stats = state['batch_stats']['BatchNorm_0']
  # Running averages start at (0, 1) and move by 0.1 of the (biased) batch statistics.
  np.testing.assert_allclose(stats['mean'], 0.1 * conv_out.mean((0, 1, 2)), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(stats['var'], 0.9 + 0.1 * conv_out.var((0, 1, 2)), rtol=1e-4)

  # In eval mode the fresh averages make BN a division by sqrt(1 + eps).
  _, state = model.apply(variables, x, train=False, mutable=['intermediates'],
                         capture_intermediates=True)
  conv_out = state['intermediates']['Conv_0']['__call__'][0]
  bn_out = state['intermediates']['BatchNorm_0']['__call__'][0]
  np.testing.assert_allclose(bn_out, conv_out / np.sqrt(1 + 1e-5), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['convlarge', 'resnet18', 'wrn28_2'])
def test_half_precision_keeps_float32_params_and_logits(name):
  model, x, variables = _tiny(name)
  width, _ = TINY[name]
  half = _model(name, width=width, half_precision=True)
  params = jax.eval_shape(functools.partial(half.init, train=False), KEYS, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))

  logits, state = half.apply(variables, x, train=False, mutable=['intermediates'],
                             capture_intermediates=True)
  assert logits.dtype == jnp.float32
  body = [v['__call__'][0] for k, v in state['intermediates'].items()
          if k not in ('head', '__call__')]
  assert body and all(a.dtype == jnp.bfloat16 for a in body)
  reference = model.apply(variables, x, train=False)
  np.testing.assert_allclose(logits, reference, atol=0.05 * np.max(np.abs(reference)))


@pytest.mark.slow
@pytest.mark.parametrize('name,last_bn', [('resnet18', 'BatchNorm_1'), ('resnet50', 'BatchNorm_2')])
def test_resnet_zero_init_residual_is_opt_in(name, last_bn):
  _, _, variables = _tiny(name)
  np.testing.assert_array_equal(variables['params']['layer1_0'][last_bn]['scale'], 1.0)
  _, _, variables = _tiny(name, zero_init_residual=True)
  np.testing.assert_array_equal(variables['params']['layer1_0'][last_bn]['scale'], 0.0)


@pytest.mark.slow
def test_resnet_stem_pads_like_pytorch():
  # With PyTorch's symmetric padding 3, output (0, 0) of the 7x7/2 stem sees input rows and
  # columns 0..3 only; Flax's SAME would pad (2, 3) and also see row/column 4.
  model, x, variables = _tiny('resnet18')
  x = jnp.zeros_like(x).at[:, 4, 4, :].set(1.0)
  _, state = model.apply(variables, x, train=False, mutable=['intermediates'],
                         capture_intermediates=True)
  stem = np.asarray(state['intermediates']['stem_conv']['__call__'][0])
  assert np.all(stem[:, 0, 0] == 0)
  assert np.all(np.any(stem[:, 1, 1] != 0, axis=-1))  # Rows/columns -1..5 hold the impulse.


def test_initializers_match_pytorch():
  key = jax.random.key(0)
  fan_in = 3 * 3 * 64
  bound = 1 / np.sqrt(fan_in)
  w = np.asarray(layers.torch_default_kernel_init(key, (3, 3, 64, 256)))
  assert bound >= np.max(np.abs(w)) > 0.99 * bound
  b = np.asarray(layers.torch_default_bias_init(fan_in)(key, (4096,)))
  assert bound >= np.max(np.abs(b)) > 0.99 * bound

  w = np.asarray(layers.kaiming_normal_fan_out(key, (3, 3, 64, 256)))
  std = np.sqrt(2 / (3 * 3 * 256))
  np.testing.assert_allclose(np.std(w), std, rtol=0.02)
  assert np.max(np.abs(w)) > 3 * std  # Untruncated, like PyTorch's.

  # The models use them: ConvLarge keeps PyTorch's defaults, including the head's bias...
  params = _tiny('convlarge')[2]['params']
  assert np.max(np.abs(params['Conv_3']['kernel'])) <= 1 / np.sqrt(3 * 3 * 4)
  head_bias = params['head']['fc']['bias']
  assert np.all(head_bias != 0) and np.max(np.abs(head_bias)) <= 1 / np.sqrt(4)
  # ...and the Wide ResNet a zero bias under a xavier-normal kernel.
  head = _tiny('wrn28_2')[2]['params']['head']['fc']
  np.testing.assert_array_equal(head['bias'], 0.0)
  assert np.std(head['kernel']) > 0


def _convlarge_map_after_last_pool_conv(size, small_input):
  """Independent reference: ConvLarge's map size after the conv that follows the second pool."""
  pooled = size // 2 // 2  # Two VALID 2x2 pools with stride 2.
  return pooled if small_input else pooled - 2  # SAME 3x3 keeps it; VALID 3x3 takes 2 off.


def _empty_map_error(name, shape):
  """The `InputTooSmallError` of an abstract init of `name` on `shape`, or None."""
  try:
    variables = _abstract_init(_model(name, width=4), shape)
  except models.InputTooSmallError as error:
    return error
  # Every 4-D activation the model computed has a non-empty map.
  for leaf in jax.tree.leaves(variables['intermediates']):
    if leaf.ndim == 4:
      assert leaf.shape[1] >= 1 and leaf.shape[2] >= 1, (name, shape, leaf.shape)
  return None


@pytest.mark.parametrize('name', sorted(TINY))
def test_each_model_works_at_its_smallest_size_and_names_it_one_below(name):
  smallest = _model(name).min_image_size
  assert _empty_map_error(name, (1, smallest, smallest, 3)) is None
  below = smallest - 1
  error = _empty_map_error(name, (1, below, below, 3))
  assert isinstance(error, models.InputTooSmallError) and isinstance(error, errors.ConfigError)
  assert f'cannot read {below}x{below} images' in str(error)
  assert f'at least {smallest}x{smallest}' in str(error)
  # Non-square: one side too short is enough.
  assert _empty_map_error(name, (1, smallest + 5, below, 3)) is not None


@pytest.mark.parametrize('name,small_input', [('convlarge', False), ('convlarge_digits', True)])
def test_convlarge_size_check_agrees_with_the_layer_arithmetic(name, small_input):
  for size in range(0, 15):
    empty = _convlarge_map_after_last_pool_conv(size, small_input) < 1
    assert (_empty_map_error(name, (1, size, size, 1)) is not None) == empty, size


def test_check_image_shape_names_the_model_the_size_and_what_works():
  config = default.get_config()
  config.model = 'convlarge'
  with pytest.raises(models.InputTooSmallError) as error:
    models.check_image_shape(config, (8, 8, 1), 10)
  message = str(error.value)
  for part in ("config.model='convlarge'", 'ConvLarge cannot read 8x8 images',
               'the 3x3 conv after the second pool (VALID padding) is 0x0',
               'config.data.image_size (at least 12', "config.model='convlarge_digits'"):
    assert part in message, part
  # Too small for the small-input variant as well: it is not offered.
  with pytest.raises(models.InputTooSmallError) as error:
    models.check_image_shape(config, (3, 3, 1), 10)
  assert 'convlarge_digits' not in str(error.value)
  models.check_image_shape(config, (12, 12, 3), 10)  # Passes.


def test_a_run_on_images_too_small_for_its_model_fails_before_writing(tmp_path):
  from semimeta_jax import train  # pylint: disable=g-import-not-at-top
  from semimeta_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  synthetic.register('synthetic_8x8', num_train=64, num_test=16, image_shape=(8, 8, 1))
  config = default.get_config()
  config.data.name, config.data.num_labels, config.model = 'synthetic_8x8', 10, 'convlarge'
  workdir = tmp_path / 'run'
  with pytest.raises(models.InputTooSmallError, match='8x8 images.*convlarge_digits'):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()
