"""`digits`: a TFDS dataset over scikit-learn's bundled handwritten digits.

scikit-learn ships the UCI "Optical Recognition of Handwritten Digits" test set
(1797 real 8x8 grayscale images, 10 classes, pixel values 0..16) inside its
package, so this dataset builds offline, in a second, into any TFDS data_dir.
It is the default dataset of the quick main run (`configs/digits.py`).

Split, fixed here once and for all: 30 test examples per class (300 in total),
drawn per class with `numpy.random.RandomState(SPLIT_SEED)` (whose stream numpy
keeps stable across releases); the other 1497 examples are the training split.
Both splits keep scikit-learn's order (ascending original index) and are stored
unshuffled, so index `i` of the train split is the same example everywhere.

Images are stored as uint8 8x8x1, scaled from 0..16 to 0..255
(round(v * 255 / 16)).
"""

import numpy as np
from sklearn import datasets as sk_datasets
import tensorflow_datasets as tfds

NUM_CLASSES = 10
TEST_PER_CLASS = 30
NUM_TRAIN = 1497
NUM_TEST = 300
SPLIT_SEED = 0


def split_indices():
  """Returns (train, test) indices into `sklearn.datasets.load_digits()`.

  Stratified: exactly `TEST_PER_CLASS` test examples per class; both arrays
  ascending.
  """
  targets = sk_datasets.load_digits().target
  rng = np.random.RandomState(SPLIT_SEED)
  test = []
  for c in range(NUM_CLASSES):
    members = np.flatnonzero(targets == c)
    test.append(rng.choice(members, TEST_PER_CLASS, replace=False))
  test = np.sort(np.concatenate(test))
  train = np.setdiff1d(np.arange(len(targets)), test)
  return train, test


def to_uint8(images):
  """Scales scikit-learn's 0..16 pixels to uint8 0..255, shape [N, 8, 8, 1]."""
  scaled = np.round(np.asarray(images, np.float64) * (255.0 / 16.0))
  return scaled.astype(np.uint8).reshape(-1, 8, 8, 1)


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 1797 handwritten 8x8 digits, fixed 1497/300 split."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Stratified 1497 train / 300 test split.'}

  def _info(self):
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1)),
            'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://archive.ics.uci.edu/dataset/80',
        # Keep generation order: train index i means the same example on every
        # machine and TFDS version.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ships with scikit-learn.
    train, test = split_indices()
    return {
        'train': self._generate_examples(train),
        'test': self._generate_examples(test),
    }

  def _generate_examples(self, indices):
    bunch = sk_datasets.load_digits()
    images = to_uint8(bunch.images)
    for rank, index in enumerate(indices):
      yield rank, {'image': images[index], 'label': int(bunch.target[index])}
