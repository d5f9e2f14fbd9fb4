"""Cost of the strong view: RandAugment + Cutout in images/s, three ways, on 32x32x3 uint8 batches.

  * ours: `randaugment.strong_view` (three fused stages per op slot), jitted;
  * naive: the per-example `vmap(lax.switch)` over the fourteen ops (`naive_strong_view`, the
    reference the tests compare against: same draws, same ops, every branch computed);
  * PIL on the host, one core: USB's `RandAugment(3, 5)` restated (`UsbRandAugment`), image by image.

Writes a markdown table to `<out>/benchmark_randaugment.md` (and prints it).

  python -m experiments.benchmark_randaugment --out=results/ --seconds=10

`fixmatch_step_rows` is where the FixMatch step's rows (with and without the strong view, 64
labeled + 448 unlabeled) go once that method is registered.
"""

import functools
import os
import random
import time

from absl import app
from absl import flags
import jax
import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageEnhance
import PIL.ImageOps

from semimeta_jax.data import randaugment
from semimeta_jax.data import randaugment_ops as ops

_OUT = flags.DEFINE_string('out', 'results', 'Directory of the results table.')
_SECONDS = flags.DEFINE_float('seconds', 10.0, 'Measured time per case.')
_BATCH = flags.DEFINE_integer('batch', 448, 'Images per batch (USB: 7 x 64 unlabeled).')
_NOTE = flags.DEFINE_string('note', '', 'What else the machine was running, said under the table.')

# USB's ops as it calls PIL (semilearn/datasets/augmentation/randaugment.py), value in its units.
PIL_OPS = {
    'AutoContrast': lambda img, _: PIL.ImageOps.autocontrast(img),
    'Brightness': lambda img, v: PIL.ImageEnhance.Brightness(img).enhance(v),
    'Color': lambda img, v: PIL.ImageEnhance.Color(img).enhance(v),
    'Contrast': lambda img, v: PIL.ImageEnhance.Contrast(img).enhance(v),
    'Equalize': lambda img, _: PIL.ImageOps.equalize(img),
    'Identity': lambda img, _: img,
    'Posterize': lambda img, v: PIL.ImageOps.posterize(img, max(1, int(v))),
    'Rotate': lambda img, v: img.rotate(v),
    'Sharpness': lambda img, v: PIL.ImageEnhance.Sharpness(img).enhance(v),
    'ShearX': lambda img, v: img.transform(img.size, PIL.Image.AFFINE, (1, v, 0, 0, 1, 0)),
    'ShearY': lambda img, v: img.transform(img.size, PIL.Image.AFFINE, (1, 0, 0, v, 1, 0)),
    'Solarize': lambda img, v: PIL.ImageOps.solarize(img, v),
    'TranslateX': lambda img, v: img.transform(img.size, PIL.Image.AFFINE,
                                               (1, 0, v * img.size[0], 0, 1, 0)),
    'TranslateY': lambda img, v: img.transform(img.size, PIL.Image.AFFINE,
                                               (1, 0, 0, 0, 1, v * img.size[1])),
}


def pil_cutout(img, side, centre_x, centre_y, fill=randaugment.USB_FILL):
  """USB's CutoutAbs with its centre given (USB draws it as np.random.uniform(w), (1, w])."""
  if side <= 0:
    return img
  w, h = img.size
  x0, y0 = int(max(0, centre_x - side / 2.0)), int(max(0, centre_y - side / 2.0))
  img = img.copy()
  colour = fill if img.mode == 'RGB' else randaugment.fill_levels(fill, 1)[0]
  PIL.ImageDraw.Draw(img).rectangle((x0, y0, min(w, x0 + side), min(h, y0 + side)), colour)
  return img


class UsbRandAugment:
  """USB's `RandAugment(n, m)` (m unused there) on PIL images, from a `random.Random`."""

  def __init__(self, num_ops: int, seed: int):
    self.num_ops = num_ops
    self.random = random.Random(seed)
    self.choices = [(name, low, high, PIL_OPS[name]) for name, low, high in randaugment.OP_RANGES]

  def __call__(self, img):
    for _, low, high, op in self.random.choices(self.choices, k=self.num_ops):
      img = op(img, low + float(high - low) * self.random.random())
    side = self.random.random() * 0.5 * img.size[0]
    w, h = img.size
    return pil_cutout(img, side, w + (1 - w) * self.random.random(), h + (1 - h) * self.random.random())


def _one_image(op, image, value):
  return op(image[None], value[None])[0]


def naive_strong_view(images, key, *, num_ops=3, magnitude=None, max_magnitude=30.0, cutout=0.5,
                      fill=randaugment.USB_FILL):
  """`strong_view` as a per-example `vmap(lax.switch)` over the ops: the same draws and result."""
  randaugment.check_arguments(images, key, num_ops=num_ops, magnitude=magnitude,
                              max_magnitude=max_magnitude, cutout=cutout, fill=fill)
  batch, height, width, channels = images.shape
  draws = randaugment.draw_policy(key, batch, height, width, num_ops=num_ops, magnitude=magnitude,
                                  max_magnitude=max_magnitude, cutout=cutout)
  branches = tuple(functools.partial(_one_image, op) for _, op in ops.OPS)

  def augment_one(image, op_row, value_row):
    for slot in range(num_ops):
      image = jax.lax.switch(op_row[slot], branches, image, value_row[slot])
    return image

  images = jax.vmap(augment_one)(images, draws.ops, draws.values)
  return randaugment.apply_cutout(images, draws.cutout_side, draws.cutout_centre,
                                  randaugment.fill_levels(fill, channels))


def _device_rate(function, images, seconds: float):
  """Images/s of a jitted (images, key) -> images function, keys changing every call."""
  compiled = jax.jit(function)
  jax.block_until_ready(compiled(images, jax.random.key(0)))
  calls, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    out = compiled(images, jax.random.key(calls + 1))
    calls += 1
    jax.block_until_ready(out)
  return calls * images.shape[0] / (time.perf_counter() - start)


def _pil_rate(images, seconds: float):
  """Images/s of USB's PIL pipeline on one core (PIL ops run in the calling thread)."""
  augment = UsbRandAugment(3, seed=0)
  pil_images = [PIL.Image.fromarray(image) for image in images]
  done, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    np.asarray(augment(pil_images[done % len(pil_images)]))
    done += 1
  return done / (time.perf_counter() - start)


def fixmatch_step_rows():
  """Rows of the FixMatch step with and without the strong view (64 + 448), once it exists.

  Returns [] until `methods.get('fixmatch')` is registered; its rows are (name, images/s, note).
  """
  return []


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (_BATCH.value, 32, 32, 3), dtype=np.uint8)
  same = np.array_equal(np.asarray(jax.jit(randaugment.strong_view)(images, jax.random.key(7))),
                        np.asarray(jax.jit(naive_strong_view)(images, jax.random.key(7))))
  load = os.getloadavg()[0]
  seconds = _SECONDS.value
  rates = [('strong_view (fused stages, jit)', _device_rate(randaugment.strong_view, images, seconds)),
           ('naive vmap(lax.switch) (jit)', _device_rate(naive_strong_view, images, seconds)),
           ("USB's RandAugment in PIL, host, one core", _pil_rate(images, seconds))]
  rows = [f'| {name} | {rate:,.0f} | {rate / rates[0][1]:.2f} |' for name, rate in rates]
  rows += [f'| {name} | {rate:,.0f} | {note} |' for name, rate, note in fixmatch_step_rows()]
  table = '\n'.join([
      f'RandAugment (3 ops) + Cutout on {_BATCH.value} x 32x32x3 uint8, jax {jax.__version__} on '
      f'{jax.devices()[0].platform} ({os.cpu_count()} cores), {seconds:.0f} s per case; '
      f'load average {load:.1f} at the start.',
      '',
      '| augmentation | images/s | relative to ours |',
      '|---|---|---|',
      *rows,
      '',
      f'naive result equal to ours (same key): {same}.'
      + ('' if fixmatch_step_rows() else ' FixMatch step rows: not measured (method not registered).'),
      *([_NOTE.value] if _NOTE.value else [])])
  print(table)
  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, 'benchmark_randaugment.md')
  with open(path, 'w') as f:
    f.write(table + '\n')
  print(f'Wrote {path}')


if __name__ == '__main__':
  app.run(main)
