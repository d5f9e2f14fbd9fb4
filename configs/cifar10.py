"""CIFAR-10, 4000 labels, ConvLarge: the official SemiMeta recipe (configs/default.py).

Every method's paper settings for CIFAR-10 are presets declared beside the method
(`PRESETS` in semimeta_jax/methods/): `--config=configs/cifar10.py:mean_teacher`.
"""

from configs import default
from semimeta_jax import methods


def get_config(preset=None):
  """Returns the CIFAR-10 configuration (paper: 7.78% test error), with a method's preset if named."""
  config = default.get_config()
  config.data.name = 'cifar10'
  config.data.num_labels = 4000
  return methods.apply_preset(config, 'cifar10', preset)
