"""What each dataset is: the static description the data layer and the loop read.

TensorFlow-free, so that everything downstream of the loading (the device
streams, the training loop, the benchmarks) runs where TensorFlow is absent.
Besides the TFDS datasets, arrays held in memory can be registered under a name
of their own (`register_in_memory`), e.g. the synthetic split of
`synthetic.py`; they are then used exactly like CIFAR, without TFDS.

This is the bottom of the data layer: it imports nothing of it. Turning a
`config.data` into one of these descriptions (built-in or registered name, a
folder, any TFDS name) is `catalog.get_spec`'s work.
"""

import dataclasses
from typing import Callable

import numpy as np

from semimeta_jax import errors

# Short names accepted in `config.data.name`.
ALIASES = {'svhn': 'svhn_cropped', 'imagenet': 'imagenet2012'}
# (train images, train labels, test images, test labels): uint8 [N, H, W, C] and int [N].
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class DatasetNotFoundError(errors.UserError, FileNotFoundError):
  """The dataset's prepared TFDS files are not in the configured data_dir."""


class UnknownDatasetError(errors.UserError, ValueError):
  """`config.data.name` names no supported dataset."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Static description of one dataset.

  Attributes:
    name: canonical name, also the TFDS name.
    train_split: TFDS split used for training (labeled and unlabeled).
    test_split: TFDS split used for evaluation.
    num_classes: number of classes.
    image_shape: (H, W, C) of the images the model sees (ImageNet: crop size).
    mean: per-channel mean of the [0, 1] pixels (normalisation).
    std: per-channel standard deviation of the [0, 1] pixels.
    augment: training augmentation: 'pad_crop_flip', 'pad_crop' (both on the
      device, `device_augment.py`), 'random_resized_crop' (ImageNet, on the
      host, `stream_augment.py`) or 'none'.
    pad: padding of the pad-and-crop augmentations, in pixels.
    in_memory: whether the training split is held whole (as uint8 on the
      devices); otherwise it is streamed from the TFDS records.
    sizes: documented (train, test) sizes, for messages only.
    num_unlabeled: the last `num_unlabeled` training rows are a truly
      unlabeled pool (label -1, e.g. a folder's `unlabeled/`): the labeled
      split is drawn from the rows before them, and the unlabeled stream draws
      from them only.
    image_key: the TFDS feature holding the image.
    label_key: the TFDS feature holding the class (a `ClassLabel`).
    unlabeled_split: a TFDS split of images without labels (STL-10's
      'unlabelled'), or ''. Its examples follow the train split's as the
      truly unlabeled rows (their number is known once the data is read).
    resize: whether the images are resized to `image_shape` as they are read
      (their stored size differs or varies).
    jpeg: streamed data: whether the records hold JPEGs (decoded only in the
      crop window) rather than another format.
  """
  name: str
  train_split: str
  test_split: str
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  augment: str
  pad: int
  in_memory: bool
  sizes: tuple[int, int]
  num_unlabeled: int = 0
  image_key: str = 'image'
  label_key: str = 'label'
  unlabeled_split: str = ''
  resize: bool = False
  jpeg: bool = True


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the training loop needs to know about the dataset.

  Attributes:
    name: canonical dataset name.
    num_classes: number of classes.
    image_shape: (H, W, C) of the batches' images.
    num_train: size of the training split.
    num_test: size of the evaluation split.
  """
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  num_train: int
  num_test: int


_CIFAR_AUG = dict(augment='pad_crop_flip', pad=4, in_memory=True)
# Means and standard deviations of CIFAR and SVHN are the official code's; those
# of ImageNet are torchvision's; those of digits and Fashion-MNIST are their training splits'.
_SPECS = {
    'digits': DatasetSpec(
        'digits', 'train', 'test', 10, (8, 8, 1), (0.30585,), (0.37633,),
        augment='pad_crop', pad=1, in_memory=True, sizes=(1497, 300)),
    # Zalando's idx files (fashion_mnist.py); statistics of its 60,000 training images. Flips keep
    # every class (clothes, shoes and bags are mirror-symmetric as classes); 2-pixel translations
    # as MNIST's in the Mean Teacher and VAT papers.
    'fashion_mnist': DatasetSpec(
        'fashion_mnist', 'train', 'test', 10, (28, 28, 1), (0.28604060,), (0.35302424,),
        augment='pad_crop_flip', pad=2, in_memory=True, sizes=(60000, 10000)),
    'cifar10': DatasetSpec(
        'cifar10', 'train', 'test', 10, (32, 32, 3),
        (0.49139968, 0.48215841, 0.44653091),
        (0.24703223, 0.24348513, 0.26158784), sizes=(50000, 10000), **_CIFAR_AUG),
    'cifar100': DatasetSpec(
        'cifar100', 'train', 'test', 100, (32, 32, 3),
        (0.50707516, 0.48654887, 0.44091784),
        (0.26733429, 0.25643846, 0.27615047), sizes=(50000, 10000), **_CIFAR_AUG),
    # No flips: digits are not mirror-symmetric.
    'svhn_cropped': DatasetSpec(
        'svhn_cropped', 'train', 'test', 10, (32, 32, 3),
        (0.4376821, 0.4437697, 0.47280442),
        (0.19803012, 0.20101562, 0.19703614),
        augment='pad_crop', pad=4, in_memory=True, sizes=(73257, 26032)),
    'imagenet2012': DatasetSpec(
        'imagenet2012', 'train', 'validation', 1000, (224, 224, 3),
        (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
        augment='random_resized_crop', pad=0, in_memory=False,
        sizes=(1281167, 50000)),
}
TFDS_NAMES = tuple(_SPECS)
# Registered in-memory datasets: name -> function returning `Arrays`.
_LOADERS: dict[str, Callable[[], Arrays]] = {}


def register_in_memory(spec: DatasetSpec, load: Callable[[], Arrays]):
  """Makes `spec.name` usable as `config.data.name`, its arrays from `load()`.

  Args:
    spec: the dataset's description (`in_memory` must be True).
    load: returns (train images, train labels, test images, test labels); it
      must return the same arrays in every process.
  """
  if not spec.in_memory:
    raise ValueError(f'{spec.name}: only in-memory datasets can be registered.')
  if spec.name in TFDS_NAMES or spec.name in ALIASES:
    raise ValueError(f'{spec.name!r} is a TFDS dataset name.')
  _SPECS[spec.name] = spec
  _LOADERS[spec.name] = load


def registered_loader(name: str) -> Callable[[], Arrays] | None:
  """The loader of a registered (non-TFDS) in-memory dataset, or None."""
  return _LOADERS.get(ALIASES.get(name, name))


def known_names() -> list[str]:
  """Every name `builtin_spec` knows (built-in, aliases, registered), for error messages."""
  return sorted(tuple(_SPECS) + tuple(ALIASES))


def builtin_spec(data_config) -> DatasetSpec | None:
  """The spec of a built-in or registered dataset name, with its image size and splits; else None.

  Args:
    data_config: `config.data`. `image_size` sets ImageNet's crop size;
      `train_split`, `test_split`, `unlabeled_split` ('' = the dataset's own)
      name TFDS splits.
  """
  name = ALIASES.get(data_config.name, data_config.name)
  if name not in _SPECS:
    return None
  spec = _SPECS[name]
  if not spec.in_memory:
    size = int(data_config.image_size)
    spec = dataclasses.replace(spec, image_shape=(size, size, 3))
  if name in _LOADERS:  # Arrays in memory: no TFDS splits to choose.
    return spec
  return with_configured_splits(spec, data_config)


def with_configured_splits(spec: DatasetSpec, data_config) -> DatasetSpec:
  """`spec` with the config's split names and feature keys where they are set.

  Any TFDS split expression works ('train[:90%]' trains on 90% of the train
  split, 'train[90%:]' then evaluates on a held-out 10%).
  """
  return dataclasses.replace(
      spec, train_split=data_config.train_split or spec.train_split,
      test_split=data_config.test_split or spec.test_split,
      unlabeled_split=data_config.unlabeled_split or spec.unlabeled_split,
      image_key=data_config.image_key, label_key=data_config.label_key)
