"""RandAugment then Cutout as USB applies them (its `RandAugment(3, m)`), on the devices.

Per example: `num_ops` ops drawn with replacement from USB's fourteen (`augment_list()`: ranges
in `OP_RANGES`), each applied with its value, then Cutout. The pixel arithmetic is PIL's
(`randaugment_ops.py` says how, op by op, and where it is not bit-exact).

Design: a per-example `vmap(lax.switch)` over the fourteen ops computes every branch for every
image (five resampling gathers, four table lookups, two histograms, four blends). Each op is one
of three kinds, so one op slot here is three stages, each computed once for the whole batch with
per-example parameters chosen by the drawn op, and the identity where the drawn op is of another
kind:
  1. an affine resample (one gather): the 16.16 fixed-point coefficients of Rotate, ShearX/Y,
     TranslateX/Y or the identity (selecting six integers per example is free);
  2. a blend with a degenerate image (black, the luma image, the mean gray level or the SMOOTH
     filter, all elementwise or 3x3 sums) with factor 1 where the op is not an enhancement;
  3. a per-channel 256-entry table lookup (one gather): AutoContrast, Equalize (one histogram),
     Posterize, Solarize or the identity.
Each stage's identity is exact, so a slot equals the drawn op alone. Each stage's output image
and the tables are written once (`randaugment_ops.computed_once`): XLA's CPU backend would
otherwise redo a stage inside every reader of it (5x the slot's time). The geometry is written here
rather than with dm-pix or jax.scipy.ndimage: those interpolate in float coordinates, while PIL's
NEAREST samples in 16.16 fixed point, which integer arithmetic reproduces exactly.

Draws: every value is a multiple of 2**-16 (Cutout's side of 2**-15), which changes USB's uniform
draws by less than 2**-17 and makes each float32 step of PIL's formulas exact or rounded once on
any backend (a blend's product f * (x - d) is exact, so a fused multiply-add cannot change it):
the ops then equal PIL's bit for bit, Rotate aside (float32 trigonometry: `randaugment_ops`).

Cutout follows USB's `CutoutAbs`: side v = u * cutout * width (u uniform in [0, 1); none when
v = 0), centre drawn as `np.random.uniform(w)`, which is numpy's `uniform(low=w, high=1)`, uniform
in (1, w] (and (1, h]); corner x0 = int(max(0, cx - v / 2)), far corner min(w, x0 + v), drawn by
`ImageDraw.rectangle`, which fills both corners' rows and columns after truncating them. The fill
is USB's (125, 123, 114); PIL refuses a colour tuple on a 1-channel image, so there it is the
colour's `convert('L')` level (123).

Every draw comes from `key` for the whole batch, so the same key gives the same images, a resumed
run replays them, and row i is the same however the batch is sharded (rows are independent).
"""

import typing

import jax
import jax.numpy as jnp
import numpy as np

from semimeta_jax.data import randaugment_ops as ops

# USB's augment_list(): (name, low, high) of each op's value, in the order ops are indexed.
OP_RANGES = (('AutoContrast', 0.0, 1.0), ('Brightness', 0.05, 0.95), ('Color', 0.05, 0.95),
             ('Contrast', 0.05, 0.95), ('Equalize', 0.0, 1.0), ('Identity', 0.0, 1.0),
             ('Posterize', 4.0, 8.0), ('Rotate', -30.0, 30.0), ('Sharpness', 0.05, 0.95),
             ('ShearX', -0.3, 0.3), ('ShearY', -0.3, 0.3), ('Solarize', 0.0, 256.0),
             ('TranslateX', -0.3, 0.3), ('TranslateY', -0.3, 0.3))
assert tuple(name for name, _, _ in OP_RANGES) == ops.OP_NAMES
_INDEX = {name: i for i, (name, _, _) in enumerate(OP_RANGES)}
# Ranges symmetric about 0: the fixed-magnitude variant draws their sign.
SYMMETRIC = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY')
USB_FILL = (125, 123, 114)
_VALUE_GRID = 2.0**16
_SIDE_GRID = 2.0**15


class PolicyDraws(typing.NamedTuple):
  """One batch's draws.

  Attributes:
    ops: int32 [B, num_ops], indices into `OP_RANGES`.
    values: float32 [B, num_ops], each op's value in USB's units.
    cutout_side: float32 [B], Cutout's side in pixels (0: none).
    cutout_centre: float32 [B, 2], its centre (x, y) in pixels.
  """
  ops: jax.Array
  values: jax.Array
  cutout_side: jax.Array
  cutout_centre: jax.Array


def _on_grid(values, grid: float):
  return jnp.round(values * grid) / grid


def op_values(ops_drawn, uniforms, signs, magnitude, max_magnitude: float):
  """float32: each drawn op's value (USB's uniform draw, or the fixed-magnitude variant).

  Args:
    ops_drawn: int32 op indices.
    uniforms: float32 in [0, 1), one per op (used when `magnitude` is None).
    signs: bool, one per op (used for the symmetric ranges when `magnitude` is set).
    magnitude: None: low + (high - low) * u, USB's form. A number m in [0, max_magnitude]: with
      r = m / max_magnitude, low + (high - low) * r for the one-sided ranges (Brightness, Color,
      Contrast, Sharpness, Posterize, Solarize; so r = 1 gives the range's top, e.g. factor 0.95,
      8 bits, threshold 256), and +-high * r with a random sign for the symmetric ones (Rotate,
      ShearX/Y, TranslateX/Y: r = 1 gives +-30 degrees, +-0.3).
    max_magnitude: the scale of `magnitude`.
  """
  low = jnp.asarray([r[1] for r in OP_RANGES], jnp.float32)[ops_drawn]
  high = jnp.asarray([r[2] for r in OP_RANGES], jnp.float32)[ops_drawn]
  if magnitude is None:
    values = low + (high - low) * uniforms
  else:
    ratio = jnp.float32(magnitude / max_magnitude)
    symmetric = jnp.asarray([name in SYMMETRIC for name, _, _ in OP_RANGES])[ops_drawn]
    values = jnp.where(symmetric, jnp.where(signs, high, -high) * ratio, low + (high - low) * ratio)
  return _on_grid(values, _VALUE_GRID)


def draw_policy(key, batch_size: int, height: int, width: int, *, num_ops: int, magnitude,
                max_magnitude: float, cutout: float) -> PolicyDraws:
  """Every random choice of one batch, from `key` (arguments as `strong_view`'s)."""
  op_key, value_key, sign_key, side_key, centre_key = jax.random.split(key, 5)
  shape = (batch_size, num_ops)
  ops_drawn = jax.random.randint(op_key, shape, 0, len(OP_RANGES), dtype=jnp.int32)
  values = op_values(ops_drawn, jax.random.uniform(value_key, shape),
                     jax.random.bernoulli(sign_key, 0.5, shape), magnitude, max_magnitude)
  side = _on_grid(jax.random.uniform(side_key, (batch_size,)) * (cutout * width), _SIDE_GRID)
  size = jnp.asarray([width, height], jnp.float32)
  centre = _on_grid(size + (1.0 - size) * jax.random.uniform(centre_key, (batch_size, 2)), _VALUE_GRID)
  return PolicyDraws(ops_drawn, values, side, centre)


def apply_cutout(images, side, centre, fill):
  """uint8 [B, H, W, C]: USB's CutoutAbs, one square per example (see the module docstring).

  Args:
    images: uint8 [B, H, W, C].
    side: float32 [B] side in pixels; 0 leaves the image as it is.
    centre: float32 [B, 2] (x, y) centre in pixels.
    fill: C levels.
  """
  _, height, width, _ = images.shape
  corner = jnp.floor(jnp.maximum(0.0, centre - side[:, None] / 2.0))
  far = jnp.minimum(jnp.asarray([width, height], jnp.float32), corner + jnp.floor(side)[:, None])
  xs = jnp.arange(width, dtype=jnp.float32)[None, None, :]
  ys = jnp.arange(height, dtype=jnp.float32)[None, :, None]
  box = lambda i: (corner[:, i, None, None], far[:, i, None, None])
  (x0, x1), (y0, y1) = box(0), box(1)
  inside = (side[:, None, None] > 0) & (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
  return jnp.where(inside[..., None], jnp.asarray(fill, jnp.uint8), images)


def fill_levels(fill, channels: int) -> tuple[int, ...]:
  """The Cutout fill of a C-channel image: the colour, or its `convert('L')` level for C = 1."""
  return (ops.luma_of_colour(fill),) if channels == 1 else tuple(int(c) for c in fill)


def apply_op_slot(images, op, value):
  """uint8 [B, H, W, C]: op `op[b]` with value `value[b]` on each image, as three fused stages."""
  batch, height, width, channels = images.shape
  is_op = lambda name: op == _INDEX[name]

  geometry = (('Rotate', lambda: ops.rotate_coefficients(value, height, width)),
              ('ShearX', lambda: ops.shear_x_coefficients(value)),
              ('ShearY', lambda: ops.shear_y_coefficients(value)),
              ('TranslateX', lambda: ops.translate_coefficients(value * width, 0.0 * value)),
              ('TranslateY', lambda: ops.translate_coefficients(0.0 * value, value * height)))
  coefficients = ops.identity_coefficients(batch)
  for name, make in geometry:
    coefficients = jnp.where(is_op(name)[:, None], make(), coefficients)
  images = ops.computed_once(ops.resample(images, coefficients))

  degenerates = (('Brightness', lambda: jnp.zeros(images.shape, jnp.int32)),
                 ('Color', lambda: ops.gray(images)), ('Contrast', lambda: ops.mean_gray(images)),
                 ('Sharpness', lambda: ops.smooth(images)))
  degenerate, enhancing = images.astype(jnp.int32), jnp.zeros_like(op, dtype=bool)
  for name, make in degenerates:
    degenerate = jnp.where(is_op(name)[:, None, None, None], make(), degenerate)
    enhancing |= is_op(name)
  images = ops.computed_once(ops.blend(degenerate, images, jnp.where(enhancing, value, 1.0)))

  tables = (('AutoContrast', lambda: ops.autocontrast_luts(images)),
            ('Equalize', lambda: ops.equalize_luts(images)),
            ('Posterize', lambda: ops.posterize_luts(value, channels)),
            ('Solarize', lambda: ops.solarize_luts(value, channels)))
  luts = ops.identity_luts(batch, channels)
  for name, make in tables:
    luts = jnp.where(is_op(name)[:, None, None], make(), luts)
  return ops.apply_lut(images, luts)


def check_arguments(images, key, *, num_ops, magnitude, max_magnitude, cutout, fill) -> None:
  """Raises ValueError (one line naming the argument) unless `strong_view` can use them."""
  def require(condition, message):
    if not condition:
      raise ValueError(f'strong_view: {message}')
  require(images.ndim == 4 and images.shape[-1] in (1, 3),
          f'images must be [B, H, W, C] with C = 1 or 3, got shape {images.shape}')
  require(images.dtype == jnp.uint8, f'images must be uint8 (0..255), got {images.dtype}')
  require(isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key),
          'key must be a typed key (jax.random.key), not a raw uint32 key')
  require(isinstance(num_ops, (int, np.integer)) and num_ops >= 0,
          f'num_ops={num_ops!r} must be an integer >= 0')
  require(max_magnitude > 0, f'max_magnitude={max_magnitude!r} must be > 0')
  require(magnitude is None or 0 <= magnitude <= max_magnitude,
          f'magnitude={magnitude!r} must be None (uniform) or in [0, max_magnitude={max_magnitude}]')
  require(0 <= cutout <= 1, f'cutout={cutout!r} must be a fraction of the image side in [0, 1]')
  require(len(fill) == 3 and all(0 <= int(c) <= 255 for c in fill),
          f'fill={fill!r} must be an (r, g, b) colour of 0..255 levels')
  require(max(images.shape[1:3]) <= 16384, f'images of {images.shape[1:3]} exceed 16384 a side')


def strong_view(images, key, *, num_ops=3, magnitude=None, max_magnitude=30.0, cutout=0.5,
                fill=USB_FILL):
  """uint8 [B, H, W, C] (C = 1 or 3) -> uint8 [B, H, W, C]: RandAugment then Cutout, per example.

  Args:
    images: uint8 [B, H, W, C].
    key: a typed key; every draw comes from it.
    num_ops: ops per image, drawn with replacement from the fourteen (USB: 3).
    magnitude: None for USB's form (each op's value uniform in its range), or a fixed magnitude
      in [0, max_magnitude] (UDA / MPL's RandAugment); `op_values` says how it maps to each op.
    max_magnitude: the top of the magnitude scale.
    cutout: Cutout's largest side as a fraction of the width (USB: 0.5; 0: no Cutout).
    fill: Cutout's colour; a 1-channel image gets its `convert('L')` level.

  Returns:
    uint8 [B, H, W, C].
  """
  check_arguments(images, key, num_ops=num_ops, magnitude=magnitude, max_magnitude=max_magnitude,
                  cutout=cutout, fill=fill)
  batch, height, width, channels = images.shape
  draws = draw_policy(key, batch, height, width, num_ops=num_ops, magnitude=magnitude,
                      max_magnitude=max_magnitude, cutout=cutout)
  for slot in range(num_ops):
    images = apply_op_slot(images, draws.ops[:, slot], draws.values[:, slot])
  return apply_cutout(images, draws.cutout_side, draws.cutout_centre, fill_levels(fill, channels))
