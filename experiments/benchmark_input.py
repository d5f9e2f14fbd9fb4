"""Throughput of the training input: examples per second of `build_input`.

Runs on mock data (`tfds.testing.mock_data`), so it needs no dataset:

  * CIFAR-shaped: a 5,000-example 32x32x3 uint8 training split held on the
    devices, batches sampled, pad-4 cropped and flipped there
    (`data/device_input.py`).
  * ImageNet-shaped: JPEG records of 500x375 images streamed through TFDS's
    reader interface, random-resized crop to 224 and flip
    (`data/record_streams.py`), shipped as uint8 and normalised on the devices.
    The records come from memory, so this measures decoding and
    augmentation, not disk reads.

Counts labeled + unlabeled examples of one process, after a warm-up, and
writes a markdown table to `<out>/benchmark_input.md` (and prints it).

  python -m experiments.benchmark_input --out=results/ --seconds=20
"""

import os
import re
import time

from absl import app
from absl import flags
from absl import logging
from configs import default
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from semimeta_jax import data

_OUT = flags.DEFINE_string('out', 'results', 'Directory of the results table.')
_SECONDS = flags.DEFINE_float('seconds', 20.0, 'Measured time per case.')
_WARMUP_STEPS = flags.DEFINE_integer('warmup_steps', 3, 'Untimed first steps.')

_CIFAR_EXAMPLES = 5000
_IMAGENET_SIZES = {'train': 20000, 'validation': 1000}
_UNIQUE_JPEGS = 64
_SPLIT = re.compile(r'^(\w+)(?:\[(\d*):(\d*)\])?$')


def _jpegs():
  """Smooth random 375x500 RGB JPEGs, about ImageNet's typical size."""
  rng = np.random.default_rng(0)
  coarse = rng.integers(0, 256, (_UNIQUE_JPEGS, 12, 16, 3)).astype(np.float32)
  images = tf.cast(tf.image.resize(coarse, (375, 500)), tf.uint8)
  return tf.stack([tf.io.encode_jpeg(image, quality=90) for image in images])


def _fake_imagenet(jpegs):
  """A `mock_data` reader serving absolute slices of a synthetic ImageNet."""

  def as_dataset(self, split, decoders=None, **unused_kwargs):
    del self, unused_kwargs
    name, start, stop = _SPLIT.match(str(split)).groups()
    ds = tf.data.Dataset.range(int(start or 0),
                               int(stop or _IMAGENET_SIZES[name]))
    if isinstance(decoders, tfds.decode.PartialDecoding):
      return ds.map(lambda i: {'label': i % 1000})
    return ds.map(lambda i: {'image': tf.gather(jpegs, i % _UNIQUE_JPEGS),
                             'label': i % 1000})

  return as_dataset


def _measure(config):
  """Returns (steps, seconds, examples per step) of the global batches on the devices."""
  inp = data.build_input(config, None, process_index=0, process_count=1)
  for step in range(_WARMUP_STEPS.value):
    jax.block_until_ready(inp.train_batch(step))
  steps, start = _WARMUP_STEPS.value, time.perf_counter()
  while time.perf_counter() - start < _SECONDS.value:
    batch = inp.train_batch(steps)
    steps += 1
    if steps % 8 == 0:  # Dispatch runs ahead; wait now and then so the clock counts done work.
      jax.block_until_ready(batch)
  jax.block_until_ready(batch)
  elapsed = time.perf_counter() - start
  per_step = sum(len(part['label']) for part in batch.values())
  return steps - _WARMUP_STEPS.value, elapsed, per_step


def _cases():
  cifar = default.get_config()
  cifar.data.label_fraction = 0.08  # 4000 labels of a 50k split, as CIFAR-10.
  imagenet = default.get_config()
  imagenet.data.name = 'imagenet2012'
  imagenet.data.label_fraction = 0.1
  imagenet.data.shuffle_buffer = 1024  # Keeps the warm-up short.
  imagenet.labeled_batch_size = imagenet.unlabeled_batch_size = 64
  yield 'CIFAR-shaped (in memory)', cifar, dict(num_examples=_CIFAR_EXAMPLES)
  yield ('ImageNet-shaped (JPEG records)', imagenet,
         dict(as_dataset_fn=_fake_imagenet(_jpegs())))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # TFDS logs every reader it opens.
  rows = []
  for name, config, mock in _cases():
    with tfds.testing.mock_data(**mock):
      steps, seconds, per_step = _measure(config)
    rows.append(
        f'| {name} | {config.labeled_batch_size} + '
        f'{config.unlabeled_batch_size} | {steps} | {steps / seconds:.1f} | '
        f'{steps * per_step / seconds:.0f} |')
  table = '\n'.join([
      f'Training-input throughput, one process, {os.cpu_count()} CPU cores '
      f'({_SECONDS.value:.0f} s per case, after {_WARMUP_STEPS.value} warm-up '
      'steps).',
      '',
      '| data | batch (labeled + unlabeled) | steps | steps/s | examples/s |',
      '|---|---|---|---|---|',
      *rows])
  print(table)
  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, 'benchmark_input.md')
  with open(path, 'w') as f:
    f.write(table + '\n')
  print(f'Wrote {path}')


if __name__ == '__main__':
  app.run(main)
