"""CIFAR-100, 10000 labels, ConvLarge, the official hyperparameters."""

from configs import default
from semimeta_jax import methods


def get_config(preset=None):
  """Returns the CIFAR-100 configuration (paper: 30.74% test error)."""
  config = default.get_config()
  config.data.name = 'cifar100'
  config.data.num_labels = 10000
  return methods.apply_preset(config, 'cifar100', preset)
