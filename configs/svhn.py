"""SVHN (cropped digits, train split), 1000 labels, ConvLarge, the official hyperparameters."""

from configs import default
from semimeta_jax import methods


def get_config(preset=None):
  """Returns the SVHN configuration (paper: 3.15% test error)."""
  config = default.get_config()
  config.data.name = 'svhn_cropped'
  config.data.num_labels = 1000
  config.semimeta.mixup_alpha = 0.1  # Beta(0.1, 0.1): mostly near-pure examples, as the official SVHN run.
  config.weight_decay = 5e-5
  return methods.apply_preset(config, 'svhn', preset)
