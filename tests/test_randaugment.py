"""RandAugment + Cutout (data/randaugment.py) against PIL, op by op, and the policy's properties.

Tolerances: every op equals PIL (Pillow as installed) pixel for pixel on the policy's values,
except Rotate, where PIL rounds a float64 matrix to 16.16 fixed point and we a float32 one: a
coefficient may be one 1/65536 step off, moving sample points by ~1e-3 pixel, so a pixel whose
source coordinate lies that close to a pixel boundary may take its neighbour's value; allowed: at
most 0.5% of an image's pixels. Interpolation: NEAREST at pixel centres, fill 0, as PIL's default.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments import benchmark_randaugment as bench
from semimeta_jax import parallel
from semimeta_jax.data import randaugment
from semimeta_jax.data import randaugment_ops as ops
from tests import conftest

_ROTATE_TOLERANCE = 0.005  # Fraction of an image's pixels (module docstring).
_NAMES = ops.OP_NAMES


def _pil(image):
  return PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _pil_op(name, image, value):
  out = np.asarray(bench.PIL_OPS[name](_pil(image), float(value)))
  return out.reshape(image.shape)


def _test_images(rng, shape, count):
  """Images that reach each op's cases: full range, narrow ranges, few levels, flat, smooth."""
  height, width, channels = shape
  full = lambda: rng.integers(0, 256, shape)
  kinds = [full,
           lambda: rng.integers(0, 26, shape),  # AutoContrast: PIL's float64 maps 25 to 254.
           lambda: rng.integers(100, 142, shape),
           lambda: rng.choice([10, 200, 201], shape),  # Equalize: step 0 and few levels.
           lambda: np.full(shape, 77),  # One level: AutoContrast and Equalize leave it.
           lambda: (np.add.outer(np.arange(height), np.arange(width))[..., None] * 255 // (height + width)
                    + rng.integers(0, 9, shape)).clip(0, 255)]
  return np.stack([kinds[i % len(kinds)]() for i in range(count)]).astype(np.uint8)


@functools.cache
def _slot_cases(shape):
  """(images, op indices, values, fused-slot output): 8 rows per op, USB's and fixed-magnitude values."""
  rng = np.random.default_rng(sum(shape))
  per_op = 8
  op_index = np.repeat(np.arange(len(_NAMES), dtype=np.int32), per_op)
  uniforms = rng.random(op_index.size, np.float32)
  uniforms[0::per_op], uniforms[1::per_op], uniforms[2::per_op] = 0.0, 0.99999, 0.5  # Range's ends.
  usb = randaugment.op_values(op_index, uniforms, None, None, 30.0)
  signs = np.tile(np.arange(per_op) % 2 == 0, len(_NAMES))
  strongest = randaugment.op_values(op_index, None, signs, 30.0, 30.0)
  values = np.where(np.arange(op_index.size) % per_op >= 6, strongest, usb).astype(np.float32)
  images = _test_images(rng, shape, op_index.size)
  out = jax.jit(randaugment.apply_op_slot)(images, op_index, values)
  return images, op_index, values, np.asarray(out)


def _assert_like_pil(name, ours, pil, context):
  if name == 'Rotate':
    assert np.mean(ours != pil) <= _ROTATE_TOLERANCE, context
  else:
    np.testing.assert_array_equal(ours, pil, err_msg=context)


@pytest.mark.parametrize('name', _NAMES)
def test_each_op_of_the_fused_slot_matches_pil(name):
  for shape in ((32, 32, 3), (12, 20, 1)):
    images, op_index, values, out = _slot_cases(shape)
    for row in np.flatnonzero(op_index == _NAMES.index(name)):
      _assert_like_pil(name, out[row], _pil_op(name, images[row], values[row]),
                       f'{name}({values[row]!r}) on {shape} image {row}')


def test_the_op_cases_reach_pil_edge_cases():
  """The cases above include an AutoContrast whose PIL top level is 254, and differing rotations."""
  images, op_index, _, out = _slot_cases((32, 32, 3))
  rows = op_index == _NAMES.index('AutoContrast')
  assert (out[rows].max(axis=(1, 2, 3)) == 254).any()
  assert (out[rows] != images[rows]).any()


def test_cutout_matches_pil_rectangle():
  """USB's CutoutAbs (ImageDraw.rectangle, both corners' rows and columns) given centre and side."""
  rng = np.random.default_rng(3)
  grid = lambda x, step: np.round(np.asarray(x, np.float32) * step) / step
  sides = grid([0.0, 0.2, 1.0, 5.5, 7.99997, 12.25, 16.0, 31.5, 32.0, 3.0], 2**15)
  centres = grid(np.stack([[32.0, 1.00002, 16.0, 31.0, 2.5, 20.0, 9.75, 1.5, 30.0, 17.0],
                           [1.00002, 32.0, 16.0, 3.0, 31.9, 8.5, 27.0, 1.2, 30.0, 5.0]], -1), 2**16)
  for channels in (3, 1):
    images = rng.integers(0, 256, (len(sides), 32, 32, channels), dtype=np.uint8)
    out = np.asarray(randaugment.apply_cutout(images, sides, centres,
                                              randaugment.fill_levels(randaugment.USB_FILL, channels)))
    for i, image in enumerate(images):
      expected = np.asarray(bench.pil_cutout(_pil(image), float(sides[i]), *map(float, centres[i])))
      np.testing.assert_array_equal(out[i], expected.reshape(image.shape), err_msg=f'cutout {i}')
    assert (out[1:] != images[1:]).any(axis=(1, 2, 3)).all()  # Every non-zero side draws.
  assert randaugment.fill_levels(randaugment.USB_FILL, 1) == (123,)  # PIL's convert('L').


def test_draws_follow_usb():
  """Ops cover the fourteen; values in USB's ranges on the 2**-16 grid; Cutout's side and centre."""
  draws = jax.jit(functools.partial(randaugment.draw_policy, batch_size=4096, height=24, width=32,
                                    num_ops=3, magnitude=None, max_magnitude=30.0, cutout=0.5))(
                                        jax.random.key(0))
  ops_drawn, values = np.asarray(draws.ops), np.asarray(draws.values)
  assert set(np.unique(ops_drawn)) == set(range(14))
  low = np.array([r[1] for r in randaugment.OP_RANGES])[ops_drawn]
  high = np.array([r[2] for r in randaugment.OP_RANGES])[ops_drawn]
  assert np.all(values >= low - 2**-17) and np.all(values <= high + 2**-17)
  np.testing.assert_array_equal(values * 2**16, np.round(values * 2**16))
  rotate = values[ops_drawn == _NAMES.index('Rotate')]
  assert rotate.min() < -25 and rotate.max() > 25  # Uniform over the range, both signs.
  side, centre = np.asarray(draws.cutout_side), np.asarray(draws.cutout_centre)
  assert side.min() >= 0 and side.max() <= 16 and side.max() > 15 and side.mean() == pytest.approx(8, abs=0.5)
  assert centre[:, 0].min() > 1 and centre[:, 0].max() <= 32 and centre[:, 1].max() <= 24
  assert centre[:, 1].max() > 23 and centre[:, 0].mean() == pytest.approx(16.5, abs=0.5)


def test_fixed_magnitude_values():
  """m / max_magnitude of the way up a one-sided range; +-high * m / max for a symmetric one."""
  names = ('Brightness', 'Posterize', 'Solarize', 'Rotate', 'ShearX', 'TranslateY', 'Rotate')
  index = np.array([_NAMES.index(n) for n in names])
  signs = np.array([True] * 6 + [False])
  values = np.asarray(randaugment.op_values(index, None, signs, 10.0, 30.0))
  np.testing.assert_allclose(values, [0.35, 16 / 3, 256 / 3, 10.0, 0.1, 0.1, -10.0], atol=2**-16)
  top = np.asarray(randaugment.op_values(index, None, signs, 30.0, 30.0))
  np.testing.assert_allclose(top, [0.95, 8.0, 256.0, 30.0, 0.3, 0.3, -30.0], atol=2**-16)


@pytest.mark.parametrize('change, message', [
    (dict(images=np.zeros((2, 8, 8, 2), np.uint8)), 'C = 1 or 3'),
    (dict(images=np.zeros((2, 8, 8, 3), np.float32)), 'must be uint8'),
    (dict(key=jax.random.PRNGKey(0)), 'typed key'),
    (dict(magnitude=31.0), 'magnitude=31.0'),
    (dict(num_ops=-1), 'num_ops=-1'),
    (dict(cutout=1.5), 'cutout=1.5'),
    (dict(fill=(1, 2)), 'fill=(1, 2)')])
def test_bad_arguments_are_one_line(change, message):
  arguments = dict(images=np.zeros((2, 8, 8, 3), np.uint8), key=jax.random.key(0)) | change
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')) as raised:
    randaugment.strong_view(arguments.pop('images'), arguments.pop('key'), **arguments)
  assert '\n' not in str(raised.value)


def test_strong_view_is_a_pure_function_of_the_key():
  """Same key: same images; other key or other row: other images; uint8 in and out; one trace."""
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
  images = np.broadcast_to(image, (12, 16, 16, 3))
  view = jax.jit(chex.assert_max_traces(randaugment.strong_view, n=1))
  first, again = view(images, jax.random.key(1)), view(images, jax.random.key(1))
  other = view(images + np.uint8(1), jax.random.key(2))
  assert first.dtype == jnp.uint8 and first.shape == images.shape
  np.testing.assert_array_equal(first, again)
  assert (np.asarray(first) != np.asarray(view(images, jax.random.key(2)))).any(axis=(1, 2, 3)).all()
  rows = np.asarray(first).reshape(12, -1)
  assert len({row.tobytes() for row in rows}) == 12  # Identical inputs, twelve different views.
  assert (np.asarray(other) != np.asarray(first)).any()


@pytest.mark.slow
@pytest.mark.parametrize('shape, magnitude', [((32, 32, 3), None), ((16, 20, 1), 13.0), ((32, 32, 3), 30.0)])
def test_strong_view_equals_the_naive_switch(shape, magnitude):
  images = np.random.default_rng(1).integers(0, 256, (64, *shape), dtype=np.uint8)
  kwargs = dict(magnitude=magnitude)
  ours = jax.jit(functools.partial(randaugment.strong_view, **kwargs))(images, jax.random.key(5))
  naive = jax.jit(functools.partial(bench.naive_strong_view, **kwargs))(images, jax.random.key(5))
  np.testing.assert_array_equal(ours, naive)
  assert (np.asarray(ours) != images).mean() > 0.5


@pytest.mark.slow
def test_sharded_over_eight_devices_equals_one():
  images = np.random.default_rng(2).integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
  mesh = parallel.make_mesh(conftest.cpu_devices(8))
  sharded = jax.device_put(images, NamedSharding(mesh, P('data')))
  key = jax.device_put(jax.random.key(9), NamedSharding(mesh, P()))
  eight = jax.jit(randaugment.strong_view)(sharded, key)
  assert len(eight.sharding.device_set) == 8
  one_device = conftest.cpu_devices(1)[0]
  one = jax.jit(randaugment.strong_view)(jax.device_put(images, one_device),
                                         jax.device_put(jax.random.key(9), one_device))
  np.testing.assert_array_equal(eight, one)


@pytest.mark.slow
@pytest.mark.parametrize('shape', [(32, 32, 3), (16, 16, 1), (17, 23, 3), (9, 13, 1)])
def test_each_op_function_matches_pil(shape):
  """The one-op functions (the naive switch's branches) on more shapes, including non-square."""
  rng = np.random.default_rng(7)
  count = 24
  images = _test_images(rng, shape, count)
  for index, (name, op) in enumerate(ops.OPS):
    values = randaugment.op_values(np.full(count, index), rng.random(count, np.float32), None, None, 30.0)
    out = np.asarray(jax.jit(op)(images, values))
    for row in range(count):
      _assert_like_pil(name, out[row], _pil_op(name, images[row], values[row]),
                       f'{name}({values[row]!r}) on {shape} image {row}')
