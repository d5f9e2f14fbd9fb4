"""scikit-learn's handwritten digits (8x8, offline): the default run, a few minutes on 2 CPU cores.

50 labels (5 per class) out of 1497 training images; 300 test images. The official
recipe scaled to a tiny dataset: a quarter-width ConvLarge for 8x8 inputs, short
warm-up and ramp, and a run short enough for a laptop.

Every method's paper settings, scaled to digits, are presets declared beside the
method (`PRESETS` in semimeta_jax/methods/): `--config=configs/digits.py:vat_ent`.
"""

from configs import default
from semimeta_jax import methods


def get_config(preset=None):
  """Returns the digits configuration, with a method's preset applied if one is named."""
  config = default.get_config()
  config.data.name = 'digits'
  config.data.num_labels = 50
  config.model = 'convlarge_digits'
  config.labeled_batch_size = 64
  config.unlabeled_batch_size = 64
  config.eval_batch_size = 320  # Divides over up to 64 devices; the 300 test images are padded.
  config.learning_rate = 0.1
  config.weight_decay = 5e-4
  config.num_train_steps = 1000
  config.warmup_steps = 100
  config.lr_decay_boundaries = (700, 900)
  config.consistency_rampup_steps = 200
  config.log_every_steps = 50
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 250
  return methods.apply_preset(config, 'digits', preset)
