"""Cost of the strong view: RandAugment + Cutout in images/s, three ways, on 32x32x3 uint8 batches.

  * ours: `randaugment.strong_view` (three fused stages per op slot), jitted;
  * naive: the per-example `vmap(lax.switch)` over the fourteen ops (`naive_strong_view`, the
    reference the tests compare against: same draws, same ops, every branch computed);
  * PIL on the host, one core: USB's `RandAugment(3, 5)` restated (`UsbRandAugment`), image by image.

Writes a markdown table to `<out>/benchmark_randaugment.md` (and prints it).

  python -m experiments.benchmark_randaugment --out=results/

With `--step_rows` (default) it also times CIFAR-10's FixMatch step (WRN-28-2, 64 labeled + 448
unlabeled) without and with the strong view in the compiled program (`fixmatch_step_rows`).
"""

import functools
import importlib
import os
import random
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageEnhance
import PIL.ImageOps

from experiments import benchmark_step
from semimeta_jax import methods
from semimeta_jax import models
from semimeta_jax.data import device_augment
from semimeta_jax.data import randaugment
from semimeta_jax.data import randaugment_ops as ops

_OUT = flags.DEFINE_string('out', 'results', 'Directory of the results table.')
_SECONDS = flags.DEFINE_float('seconds', 5.0, 'Measured time per case and round.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Rounds over the cases in turn; the median is reported.')
_BATCH = flags.DEFINE_integer('batch', 448, 'Images per batch (USB: 7 x 64 unlabeled).')
_NOTE = flags.DEFINE_string('note', '', 'What else the machine was running, said under the table.')
_STEP_ROWS = flags.DEFINE_bool('step_rows', True, 'Also time the FixMatch step without and with the view.')
_STEP_MODEL = flags.DEFINE_string('step_model', '', "The step rows' model (default: the preset's WRN-28-2).")
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed FixMatch steps per row (after one warm-up step).')

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


def _rates(run_one, images_per_run: int, seconds: float):
  """(images per wall-clock second, images per CPU-second of this process) of repeated `run_one`.

  On a shared machine the wall clock counts other jobs' time too; the CPU time counts only the
  work done here (all threads: XLA's two, PIL's one).
  """
  runs, wall, cpu = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - wall < seconds:
    run_one(runs)
    runs += 1
  done = runs * images_per_run
  return done / (time.perf_counter() - wall), done / (time.process_time() - cpu)


def _device_rate(function, images):
  """A function of `seconds` -> rates of a jitted (images, key) -> images function (compiled now)."""
  compiled = jax.jit(function)
  jax.block_until_ready(compiled(images, jax.random.key(0)))
  run_one = lambda i: jax.block_until_ready(compiled(images, jax.random.key(i + 1)))
  return lambda seconds: _rates(run_one, images.shape[0], seconds)


def _pil_rate(images):
  """A function of `seconds` -> rates of USB's PIL pipeline on one core (the calling thread)."""
  augment = UsbRandAugment(3, seed=0)
  pil_images = [PIL.Image.fromarray(image) for image in images]
  run_one = lambda i: np.asarray(augment(pil_images[i % len(pil_images)]))
  return lambda seconds: _rates(run_one, 1, seconds)


def _fixmatch_config(model: str):
  """CIFAR-10's FixMatch preset (USB's: WRN-28-2, 64 labeled + 448 unlabeled), `model` if given."""
  config = importlib.import_module('configs.cifar10').get_config('fixmatch')
  if model:
    config.model = model
  return config


def fixmatch_step_rows(model: str = '', steps: int = 3, warmup_steps: int = 1):
  """(name, images/s, note) of the FixMatch step without and with the strong view in the program.

  Without: the step on a batch whose 'strong_image' is given (as if free). With: the same step
  after `strong_view` of the 448 uint8 unlabeled images and their normalisation, in one jit.
  Each step is awaited; the median of `steps` after `warmup_steps`. [] if FixMatch is not
  registered. The weak view (flip + translate) is in neither.
  """
  if 'fixmatch' not in methods.METHOD_NAMES:
    return []
  config = _fixmatch_config(model)
  image_shape, num_classes = (32, 32, 3), 10
  labeled, unlabeled = config.labeled_batch_size, config.unlabeled_batch_size
  init_key, data_key = jax.random.split(jax.random.key(0))
  step = methods.make_train_step(config, num_classes)
  normalize = lambda images: device_augment.normalize(images, (0.5,) * 3, (0.25,) * 3)
  raw = jax.random.randint(data_key, (unlabeled, *image_shape), 0, 256).astype(jnp.uint8)
  batch = {'labeled': {'image': normalize(raw[:labeled]), 'label': jnp.arange(labeled) % num_classes,
                       'index': jnp.arange(labeled, dtype=jnp.int32)},
           'unlabeled': {'image': normalize(raw), 'strong_image': normalize(raw[::-1]),
                         'label': jnp.zeros(unlabeled, jnp.int32),
                         'index': labeled + jnp.arange(unlabeled, dtype=jnp.int32)}}

  def with_view(state, batch, key):
    strong = normalize(randaugment.strong_view(raw, key))
    return step(state, {**batch, 'unlabeled': {**batch['unlabeled'], 'strong_image': strong}})

  programs = (('FixMatch step, strong view given', jax.jit(lambda state, batch, key: step(state, batch),
                                                         donate_argnums=0)),
              ('FixMatch step with strong_view in it', jax.jit(with_view, donate_argnums=0)))
  rows, medians = [], []
  for name, program in programs:
    model = models.get_model(config, num_classes)
    state = benchmark_step.initial_state(config, model, image_shape, init_key)
    times = []
    for i in range(warmup_steps + steps):
      tick = time.perf_counter()
      state, metrics = program(state, batch, jax.random.key(i))
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - tick)
    medians.append(float(np.median(times[warmup_steps:])))
    note = (f'{config.model}, {labeled} + {unlabeled}, median of {steps} steps of '
            f'{", ".join(f"{t:.2f}" for t in times[warmup_steps:])} s')
    if len(medians) == 2:
      note += f'; the strong view adds {100 * (medians[1] / medians[0] - 1):.1f}% to the step'
    rows.append((name, f'{(labeled + 2 * unlabeled) / medians[-1]:,.1f} (images the step reads)', note))
  return rows


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (_BATCH.value, 32, 32, 3), dtype=np.uint8)
  same = np.array_equal(np.asarray(jax.jit(randaugment.strong_view)(images, jax.random.key(7))),
                        np.asarray(jax.jit(naive_strong_view)(images, jax.random.key(7))))
  load = os.getloadavg()[0]
  seconds = _SECONDS.value
  cases = [('strong_view (fused stages, jit)', _device_rate(randaugment.strong_view, images)),
           ('naive vmap(lax.switch) (jit)', _device_rate(naive_strong_view, images)),
           ("USB's RandAugment in PIL, host, one core", _pil_rate(images))]
  measured = [[] for _ in cases]
  for _ in range(_ROUNDS.value):  # In turn, so a change of the machine's load reaches every case.
    for rates, (_, measure) in zip(measured, cases):
      rates.append(measure(seconds))
  rates = [(name, *np.median(np.asarray(r), axis=0)) for (name, _), r in zip(cases, measured)]
  rows = [f'| {name} | {wall:,.0f} | {cpu:,.0f} | {cpu / rates[0][2]:.2f} |' for name, wall, cpu in rates]
  step_rows = fixmatch_step_rows(_STEP_MODEL.value, _STEPS.value) if _STEP_ROWS.value else []
  table = '\n'.join([
      f'RandAugment (3 ops) + Cutout on {_BATCH.value} x 32x32x3 uint8, jax {jax.__version__} on '
      f'{jax.devices()[0].platform} ({os.cpu_count()} cores), median of {_ROUNDS.value} rounds of '
      f'{seconds:.0f} s per case; load average {load:.1f} at the start.',
      '',
      '| augmentation | images/s (wall clock) | images per CPU-second | per CPU-second, relative to ours |',
      '|---|---|---|---|',
      *rows,
      '',
      f'naive result equal to ours (same key): {same}.',
      *(['', '| step | images/s | note |', '|---|---|---|',
         *[f'| {name} | {rate} | {note} |' for name, rate, note in step_rows]] if step_rows else
        ['FixMatch step rows: not measured.']),
      *(['', _NOTE.value] if _NOTE.value else [])])
  print(table)
  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, 'benchmark_randaugment.md')
  with open(path, 'w') as f:
    f.write(table + '\n')
  print(f'Wrote {path}')


if __name__ == '__main__':
  app.run(main)
