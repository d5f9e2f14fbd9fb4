"""CIFAR-10, 4000 labels, ConvLarge: the official SemiMeta recipe (configs/default.py)."""

from configs import default


def get_config():
  """Returns the CIFAR-10 configuration (paper: 7.78% test error)."""
  config = default.get_config()
  config.data.name = 'cifar10'
  config.data.num_labels = 4000
  return config
