"""CIFAR-100, 10000 labels, ConvLarge, the official hyperparameters."""

from configs import default


def get_config():
  """Returns the CIFAR-100 configuration (paper: 30.74% test error)."""
  config = default.get_config()
  config.data.name = 'cifar100'
  config.data.num_labels = 10000
  return config
