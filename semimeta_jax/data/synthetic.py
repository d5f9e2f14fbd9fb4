"""A synthetic in-memory dataset: random uint8 images, for benchmarks and tests.

Registered under a name of its own (`register`), it goes through exactly the
path CIFAR takes (device-resident split, on-device sampling and augmentation,
padded evaluation) without TFDS or TensorFlow.
"""

import numpy as np

from semimeta_jax.data import specs


def make_arrays(num_train: int, num_test: int, image_shape, num_classes: int, seed: int = 0):
  """(train images, train labels, test images, test labels): uniform uint8 pixels and labels.

  Labels cycle through the classes (every class gets the same count, +-1), so
  any class-balanced label budget up to num_train // num_classes fits.
  """
  rng = np.random.default_rng(seed)
  make = lambda n: (rng.integers(0, 256, (n, *image_shape), dtype=np.uint8),
                    rng.permutation(np.arange(n) % num_classes).astype(np.int64))
  return (*make(num_train), *make(num_test))


def register(name: str = 'synthetic_cifar10', *, num_train: int = 50000, num_test: int = 10000,
             image_shape=(32, 32, 3), num_classes: int = 10, augment: str = 'pad_crop_flip',
             pad: int = 4, seed: int = 0) -> specs.DatasetSpec:
  """Registers a synthetic dataset as `config.data.name=name`; CIFAR-10-shaped by default.

  Its arrays are made when a run loads them (in every process, from `seed`).
  Registering the same name again replaces it.

  Returns:
    The registered `DatasetSpec` (CIFAR-10's normalisation constants).
  """
  channels = image_shape[-1]
  spec = specs.DatasetSpec(
      name, 'train', 'test', num_classes, tuple(image_shape),
      mean=(0.49139968, 0.48215841, 0.44653091)[:channels] if channels == 3 else (0.5,) * channels,
      std=(0.24703223, 0.24348513, 0.26158784)[:channels] if channels == 3 else (0.25,) * channels,
      augment=augment, pad=pad, in_memory=True, sizes=(num_train, num_test))
  specs.register_in_memory(
      spec, lambda: make_arrays(num_train, num_test, image_shape, num_classes, seed))
  return spec
