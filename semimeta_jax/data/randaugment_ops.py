"""RandAugment's fourteen image ops in PIL's pixel arithmetic, on uint8 [B, H, W, C] batches.

Each op takes a batch and one value per example (float32 [B], in the units USB passes to PIL) and
is one of three kinds, the structure `randaugment.py` fuses:

  * a per-channel 256-entry lookup table (`apply_lut`): AutoContrast, Equalize, Posterize,
    Solarize, as `ImageOps` builds them (`Image.point` clips entries to [0, 255]);
  * a blend with a degenerate image (`blend`, `ImageEnhance` = `Image.blend(degenerate, image, f)`):
    Brightness (black), Color (`convert('L')`), Contrast (the rounded mean of the L image, one
    gray level), Sharpness (the SMOOTH filter);
  * an affine resample (`resample`), nearest neighbour at pixel centres, fill 0, in PIL's 16.16
    fixed point: Rotate, ShearX, ShearY (PIL's `affine_fixed`), TranslateX, TranslateY (PIL's
    scale path, `floor(x + 0.5 + t)`, written in the same fixed-point form exactly).

Where PIL computes in integers (luma, the SMOOTH filter's rounding, Equalize, the fixed-point
sampling, Posterize, the Contrast mean) this module computes the same integers. Where PIL computes
in float:
  * Blends: float32 `d + f * (x - d)` truncated, as PIL's C. For a factor that is a multiple of
    2**-16 in [0, 1] (the policy draws only those) the product is exact, so the result is PIL's
    on any backend; for other factors a compiler that fuses a multiply-add (XLA's CPU backend
    does) may round the other way where the result lies within float32 rounding of an integer.
  * AutoContrast: Python's float64 `int(i * scale + offset)` falls one level below the exact
    `(i - lo) * 255 / (hi - lo)` for 12094 of the 2.8 million (lo, hi, i) triples (e.g. the top
    of a [0, 25] image maps to 254); those triples are tabulated once on the host (by (lo, hi),
    at most 17 levels each) and subtracted, so the tables are PIL's exactly.
  * Rotate: PIL rounds the float64 matrix to 16.16 fixed point; here it is float32, so a
    coefficient can land one 1/65536 step away, moving sample points by at most ~1e-3 pixel: a
    pixel differs only where its source coordinate is that close to a pixel boundary. ShearX/Y's
    coefficients are exact (a float32 value times a power of two). TranslateX/Y's `t * size` is
    float64 in PIL, float32 here: differs only within float32 rounding of a half-integer.
Images up to 16384 pixels a side (the fixed-point products stay within int32).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

_LEVELS = 256
_ONE = 65536  # 1.0 in PIL's 16.16 fixed point.
_HALF = 32768


def _per_example(values, ndim: int = 4):
  """float32 [B] -> [B, 1, ...] broadcastable against a [B, ...] array of `ndim` dimensions."""
  return jnp.asarray(values, jnp.float32).reshape((-1,) + (1,) * (ndim - 1))


def luma(images):
  """int32 [B, H, W]: PIL's `convert('L')` of RGB, ITU-R 601-2 in its 16-bit fixed point."""
  x = images.astype(jnp.int32)
  return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16


def luma_of_colour(colour) -> int:
  """The gray level PIL's `convert('L')` gives an (r, g, b) colour (125, 123, 114 -> 123)."""
  r, g, b = (int(c) for c in colour)
  return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16


def gray(images):
  """int32 [B, H, W, C]: Color's degenerate, `convert('L').convert(mode)` (an L image is its own)."""
  if images.shape[-1] == 1:
    return images.astype(jnp.int32)
  return jnp.broadcast_to(luma(images)[..., None], images.shape)


def mean_gray(images):
  """int32 [B, H, W, C]: Contrast's degenerate, `int(mean(L) + 0.5)` everywhere, in integers.

  `int(s / n + 0.5)` = `(2 s + n) // (2 n)` exactly (float64 rounds s / n correctly and a
  half-integer mean is representable), for sums below 2**30 (images up to ~2000x2000).
  """
  level = images[..., 0].astype(jnp.int32) if images.shape[-1] == 1 else luma(images)
  count = level.shape[1] * level.shape[2]
  total = jnp.sum(level, axis=(1, 2))
  mean = (2 * total + count) // (2 * count)
  return jnp.broadcast_to(mean[:, None, None, None], images.shape)


def smooth(images):
  """float32 [B, H, W, C]: PIL's `ImageFilter.SMOOTH`, 3x3 [[1,1,1],[1,5,1],[1,1,1]] / 13.

  PIL sums in float32 from 0.5 and truncates; the exact S / 13 of an integer sum S is never within
  1/26 of a half-integer, so any float rounding gives PIL's floor((S + 6.5) / 13). The outer
  rows and columns are copied, as PIL's. (A `where` over the border, not a slice update: XLA's CPU
  backend runs the update ten times slower.)
  """
  x = images.astype(jnp.float32)
  height, width = x.shape[1], x.shape[2]
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  weighted = sum(padded[:, dy:height + dy, dx:width + dx] for dy in range(3) for dx in range(3)) + 4 * x
  ys = jnp.arange(height)[:, None, None]
  xs = jnp.arange(width)[None, :, None]
  border = (ys == 0) | (ys == height - 1) | (xs == 0) | (xs == width - 1)
  return jnp.where(border, x, jnp.floor((weighted + 6.5) * (1.0 / 13.0)))


def blend(degenerate, images, factor):
  """uint8: PIL's `Image.blend(degenerate, images, factor)` with one factor per example.

  float32 `d + f * (x - d)`, truncated toward zero and clipped to [0, 255] (PIL clips only for
  factors outside [0, 1], where the result can leave the range). Factors 0 and 1 give `d` and `x`
  exactly, as PIL's shortcuts.
  """
  d = degenerate.astype(jnp.float32)
  out = d + _per_example(factor) * (images.astype(jnp.float32) - d)
  return jnp.clip(jnp.trunc(out), 0, 255).astype(jnp.uint8)


def computed_once(values):
  """`values` [B, ...], written to memory before they are read.

  XLA's CPU backend otherwise fuses a computation into each of its readers and redoes it there:
  a table into the lookup, once per pixel (AutoContrast's table and lookup: 38 ms against 11 ms
  for 448 32x32x3 images); a resampled and blended image into the histogram, the min / max and
  the lookup (one op slot: 79 ms against 16 ms). A scatter is not fused into its consumers (an
  optimization barrier would be: XLA removes it before fusing).
  """
  rows = jnp.arange(values.shape[0])
  return jnp.zeros_like(values).at[rows].set(values, unique_indices=True, indices_are_sorted=True)


def apply_lut(images, luts):
  """uint8 [B, H, W, C]: `out[b, ..., c] = luts[b, c, images[b, ..., c]]` (`Image.point`)."""
  batch, height, width, channels = images.shape
  luts = computed_once(luts)
  index = images.astype(jnp.int32) + _LEVELS * jnp.arange(channels, dtype=jnp.int32)
  out = jnp.take_along_axis(luts.reshape(batch, channels * _LEVELS),
                            index.reshape(batch, -1), axis=1, mode='clip')
  return out.reshape(batch, height, width, channels).astype(jnp.uint8)


def histograms(images):
  """int32 [B, C, 256]: each example's per-channel histogram (`Image.histogram`)."""
  batch, _, _, channels = images.shape
  index = (images.astype(jnp.int32) + _LEVELS * jnp.arange(channels, dtype=jnp.int32)).reshape(batch, -1)
  count = lambda row: jnp.zeros(channels * _LEVELS, jnp.int32).at[row].add(1)
  return jax.vmap(count)(index).reshape(batch, channels, _LEVELS)


@functools.cache
def _autocontrast_float64_drops() -> tuple[np.ndarray, np.ndarray, int]:
  """Where PIL's float64 AutoContrast table is one below the exact (lo, hi, i), by (lo, hi).

  PIL: `scale = 255.0 / (hi - lo)`, `offset = -lo * scale`, `int(i * scale + offset)`; numpy's
  float64 ufuncs round each operation as Python does. Returns (int32 [65537] start of each pair
  lo * 256 + hi in the levels, int32 levels i, the most levels of one pair (17)).
  """
  lo, hi, level = np.meshgrid(np.arange(256), np.arange(256), np.arange(256), indexing='ij')
  keep = (hi > lo) & (level >= lo) & (level <= hi)
  lo, hi, level = lo[keep], hi[keep], level[keep]  # In (lo, hi, i) order.
  scale = 255.0 / (hi - lo).astype(np.float64)
  pil = np.trunc(level.astype(np.float64) * scale + (-lo.astype(np.float64) * scale))
  drop = pil < ((level - lo) * 255) // (hi - lo)
  pairs = lo[drop] * 256 + hi[drop]
  starts = np.searchsorted(pairs, np.arange(256 * 256 + 1)).astype(np.int32)
  return starts, level[drop].astype(np.int32), int(np.max(np.diff(starts)))


def autocontrast_luts(images):
  """int32 [B, C, 256]: `ImageOps.autocontrast` (cutoff 0): each channel's [lo, hi] to [0, 255]."""
  lo = jnp.min(images, axis=(1, 2)).astype(jnp.int32)[..., None]  # [B, C, 1]
  hi = jnp.max(images, axis=(1, 2)).astype(jnp.int32)[..., None]
  level = jnp.arange(_LEVELS, dtype=jnp.int32)
  stretched = ((level - lo) * 255) // jnp.maximum(hi - lo, 1)
  starts, drop_levels, most = _autocontrast_float64_drops()
  starts, drop_levels = jnp.asarray(starts), jnp.asarray(drop_levels)
  first = starts[lo * 256 + hi]  # [B, C, 1]
  nth = jnp.arange(most, dtype=jnp.int32)
  drops = jnp.where(nth < starts[lo * 256 + hi + 1] - first,
                    drop_levels[jnp.minimum(first + nth, drop_levels.shape[0] - 1)], -1)  # [B, C, most]
  dropped = jnp.any(level[:, None] == drops[..., None, :], axis=-1)
  stretched = jnp.clip(stretched - dropped.astype(jnp.int32), 0, 255)
  return jnp.where(hi > lo, stretched, level)


def equalize_luts(images):
  """int32 [B, C, 256]: `ImageOps.equalize`, PIL's step rule in integers.

  step = (pixels - count of the top level present) // 255; entry i = (step // 2 + pixels below
  i) // step, clipped to 255; the identity where a channel has one level or step is 0.
  """
  hist = histograms(images)
  level = jnp.arange(_LEVELS, dtype=jnp.int32)
  top = jnp.max(images, axis=(1, 2)).astype(jnp.int32)[..., None]
  top_count = jnp.take_along_axis(hist, top, axis=-1)
  pixels = images.shape[1] * images.shape[2]
  step = (pixels - top_count) // 255
  # A log-depth scan: XLA's CPU cumsum is a quadratic window sum.
  below = jax.lax.associative_scan(jnp.add, hist, axis=-1) - hist
  table = jnp.minimum((step // 2 + below) // jnp.maximum(step, 1), 255)
  flat = (jnp.sum(hist > 0, axis=-1, keepdims=True) <= 1) | (step == 0)
  return jnp.where(flat, level, table)


def posterize_luts(bits, channels: int):
  """int32 [B, C, 256]: `ImageOps.posterize(img, max(1, int(bits)))`, keeping the top bits."""
  bits = jnp.clip(jnp.floor(jnp.asarray(bits, jnp.float32)).astype(jnp.int32), 1, 8)
  mask = 256 - jnp.left_shift(1, 8 - bits)
  table = jnp.bitwise_and(jnp.arange(_LEVELS, dtype=jnp.int32), mask[:, None])
  return jnp.broadcast_to(table[:, None, :], (table.shape[0], channels, _LEVELS))


def solarize_luts(threshold, channels: int):
  """int32 [B, C, 256]: `ImageOps.solarize`: levels at or above the threshold inverted."""
  level = jnp.arange(_LEVELS, dtype=jnp.int32)
  table = jnp.where(level < _per_example(threshold, 2), level, 255 - level)
  return jnp.broadcast_to(table[:, None, :], (table.shape[0], channels, _LEVELS))


def identity_luts(batch: int, channels: int):
  """int32 [B, C, 256]: the identity table."""
  return jnp.broadcast_to(jnp.arange(_LEVELS, dtype=jnp.int32), (batch, channels, _LEVELS))


def _fix(value):
  """int32: PIL's FIX, floor(v * 65536 + 0.5), of float32 values."""
  return jnp.floor(value * _ONE + 0.5).astype(jnp.int32)


def _stack(a0, a1, a2, a3, a4, a5):
  """int32 [B, 6] fixed-point coefficients: xin = (a2 + a0 x + a1 y) >> 16, yin = (a5 + a3 x + a4 y) >> 16."""
  batch = jnp.broadcast_shapes(*(jnp.shape(a) for a in (a0, a1, a2, a3, a4, a5)))
  return jnp.stack([jnp.broadcast_to(jnp.asarray(a, jnp.int32), batch) for a in (a0, a1, a2, a3, a4, a5)],
                   axis=-1)


def identity_coefficients(batch: int):
  """int32 [B, 6]: the identity resample."""
  return _stack(jnp.full((batch,), _ONE), 0, _HALF, 0, _ONE, _HALF)


def shear_x_coefficients(shear):
  """int32 [B, 6]: `img.transform(size, AFFINE, (1, v, 0, 0, 1, 0))`, PIL's FIX exactly.

  v * 65536 and v * 32768 are exact in float32 (powers of two) and + 0.5 is exact below 2**22.
  """
  shear = jnp.asarray(shear, jnp.float32)
  return _stack(_ONE, _fix(shear), _HALF + _fix(shear * 0.5), 0, _ONE, _HALF)


def shear_y_coefficients(shear):
  """int32 [B, 6]: `img.transform(size, AFFINE, (1, 0, 0, v, 1, 0))`."""
  shear = jnp.asarray(shear, jnp.float32)
  return _stack(_ONE, 0, _HALF, _fix(shear), _ONE, _HALF + _fix(shear * 0.5))


def translate_coefficients(shift_x, shift_y):
  """int32 [B, 6]: `img.transform(size, AFFINE, (1, 0, tx, 0, 1, ty))` (tx, ty in pixels).

  PIL's scale path samples floor(x + 0.5 + tx): the whole-pixel shift floor(0.5 + tx) in fixed point.
  """
  whole = lambda shift: jnp.floor(jnp.asarray(shift, jnp.float32) + 0.5).astype(jnp.int32) * _ONE
  return _stack(_ONE, 0, _HALF + whole(shift_x), 0, _ONE, _HALF + whole(shift_y))


def _fixed_centre_offset(size_x: int, centre_terms):
  """int32: FIX(32768 * size_x - sum(coef * (n - 1) / 2)), exactly, for coefs of 1/256 steps.

  Each coef (float32, |coef| <= 2**16, so a multiple of 2**-8) splits into its floor and 256ths,
  so the sum is integers over 512, summed in int32 without rounding (n <= 16384).
  """
  halves, parts = 0, 0
  for coef, size in centre_terms:
    whole = jnp.floor(coef)
    halves = halves + whole.astype(jnp.int32) * (size - 1)
    parts = parts + ((coef - whole) * 256).astype(jnp.int32) * (size - 1)
  # value = 32768 size_x - halves / 2 - parts / 512; FIX = floor(value + 1/2).
  rest = 256 - 256 * jnp.bitwise_and(halves, 1) - jnp.bitwise_and(parts, 511)
  return (_HALF * size_x - jnp.right_shift(halves, 1) - jnp.right_shift(parts, 9)
          + jnp.floor_divide(rest, 512))


def rotate_coefficients(degrees, height: int, width: int):
  """int32 [B, 6]: `img.rotate(degrees)` (counter-clockwise about (w / 2, h / 2), NEAREST).

  PIL's inverse matrix (a, b, c; d, e, f) = (cos t, sin t, c; -sin t, cos t, f), t = -radians,
  c and f keeping the centre fixed, then FIX(a), FIX(b), FIX(c + a/2 + b/2), FIX(d), FIX(e),
  FIX(f + d/2 + e/2). Here cos and sin are float32 (the one inexact step); the rest is exact
  integer arithmetic on their values, so no compiler's rounding choices can change it.
  """
  radians = jnp.asarray(degrees, jnp.float32) * jnp.float32(np.pi / 180.0)
  a = jnp.cos(radians) * _ONE  # Scaled by a power of two: exact.
  b = -jnp.sin(radians) * _ONE
  fix = lambda scaled: jnp.floor(scaled + 0.5).astype(jnp.int32)  # + 0.5 is exact below 2**23.
  return _stack(fix(a), fix(b), _fixed_centre_offset(width, ((a, width), (b, height))),
                fix(-b), fix(a), _fixed_centre_offset(height, ((-b, width), (a, height))))


def resample(images, coefficients):
  """uint8 [B, H, W, C]: nearest-neighbour affine resample, 0 outside, one gather per batch."""
  batch, height, width, channels = images.shape
  ys, xs = jnp.meshgrid(jnp.arange(height, dtype=jnp.int32), jnp.arange(width, dtype=jnp.int32),
                        indexing='ij')
  a = [coefficients[:, i, None, None] for i in range(6)]
  source_x = jax.lax.shift_right_arithmetic(a[2] + a[0] * xs + a[1] * ys, 16)
  source_y = jax.lax.shift_right_arithmetic(a[5] + a[3] * xs + a[4] * ys, 16)
  inside = (source_x >= 0) & (source_x < width) & (source_y >= 0) & (source_y < height)
  flat = jnp.where(inside, source_y * width + source_x, 0).reshape(batch, height * width, 1)
  out = jnp.take_along_axis(images.reshape(batch, height * width, channels), flat, axis=1)
  return jnp.where(inside[..., None], out.reshape(images.shape), jnp.uint8(0))


# The ops one at a time (USB's functions), each (uint8 [B, H, W, C], float32 [B]) -> uint8.
def autocontrast(images, _):
  return apply_lut(images, autocontrast_luts(images))


def brightness(images, factor):
  return blend(jnp.zeros_like(images), images, factor)


def color(images, factor):
  return blend(gray(images), images, factor)


def contrast(images, factor):
  return blend(mean_gray(images), images, factor)


def equalize(images, _):
  return apply_lut(images, equalize_luts(images))


def identity(images, _):
  return images


def posterize(images, bits):
  return apply_lut(images, posterize_luts(bits, images.shape[-1]))


def rotate(images, degrees):
  return resample(images, rotate_coefficients(degrees, images.shape[1], images.shape[2]))


def sharpness(images, factor):
  return blend(smooth(images), images, factor)


def shear_x(images, shear):
  return resample(images, shear_x_coefficients(shear))


def shear_y(images, shear):
  return resample(images, shear_y_coefficients(shear))


def solarize(images, threshold):
  return apply_lut(images, solarize_luts(threshold, images.shape[-1]))


def translate_x(images, fraction):
  """USB's TranslateX: the fraction of the width, `v * img.size[0]` pixels."""
  shift = jnp.asarray(fraction, jnp.float32) * images.shape[2]
  return resample(images, translate_coefficients(shift, jnp.zeros_like(shift)))


def translate_y(images, fraction):
  """USB's TranslateY: the fraction of the height, `v * img.size[1]` pixels."""
  shift = jnp.asarray(fraction, jnp.float32) * images.shape[1]
  return resample(images, translate_coefficients(jnp.zeros_like(shift), shift))


# USB's `augment_list()` order; randaugment.py indexes ops by position in it.
OPS = (('AutoContrast', autocontrast), ('Brightness', brightness), ('Color', color),
       ('Contrast', contrast), ('Equalize', equalize), ('Identity', identity),
       ('Posterize', posterize), ('Rotate', rotate), ('Sharpness', sharpness), ('ShearX', shear_x),
       ('ShearY', shear_y), ('Solarize', solarize), ('TranslateX', translate_x),
       ('TranslateY', translate_y))
OP_NAMES = tuple(name for name, _ in OPS)
