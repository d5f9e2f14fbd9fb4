"""The teacher's UDA term in Meta Pseudo Labels (the released code's CIFAR-10 recipe).

With `mpl.uda_weight` > 0 the teacher also sees the strong view of the unlabeled batch
('strong_image', RandAugment) and learns consistency between its two views:

  targets = softmax(T(weak) / uda_temperature)          (held constant)
  mask_i  = [max_c targets_ic >= uda_threshold]
  L_uda   = (1 / B_u) sum_i mask_i CE(targets_i, T(strong)_i)

weighted by uda_weight * min(1, step / uda_rampup_steps). The student then learns on
the strong view, labelled by the teacher's forward on that view, and the feedback is
taken there, as in the released code (student and feedback on the augmented images).
The mask on the sharpened probabilities and the linear ramp are how this project
reads the released flags (`uda_temp`, `uda_threshold`, `uda_weight`, `uda_steps`).
"""

import jax
import jax.numpy as jnp

from semimeta_jax import errors
from semimeta_jax.methods import confidence


def fields():
  """The `mpl` block's UDA fields and their defaults (off)."""
  return {
      'uda_weight': 0.0,  # Weight of the teacher's UDA term; 0 = off (no strong view is built).
      'uda_temperature': 0.7,  # Sharpening of the weak view's targets.
      'uda_threshold': 0.6,  # Smallest max-probability of a sharpened target that is trained on.
      'uda_rampup_steps': 0,  # The weight rises linearly over these steps (0: full from the start).
  }


def enabled(config) -> bool:
  """Whether the teacher learns UDA, hence whether the batches carry the strong view."""
  return config.mpl.uda_weight > 0


def validate(config) -> None:
  """uda_weight >= 0, uda_temperature > 0, uda_threshold in [0, 1], uda_rampup_steps >= 0."""
  block = config.mpl
  errors.require(block.uda_weight >= 0, 'mpl.uda_weight', block.uda_weight, 'must be >= 0 (0 = off)')
  errors.require(block.uda_temperature > 0, 'mpl.uda_temperature', block.uda_temperature, 'must be > 0')
  confidence.validate_fraction(config, 'mpl.uda_threshold')
  errors.require(isinstance(block.uda_rampup_steps, int) and block.uda_rampup_steps >= 0,
                 'mpl.uda_rampup_steps', block.uda_rampup_steps, 'must be an integer >= 0')


def weight(config, step):
  """uda_weight * min(1, step / uda_rampup_steps)."""
  block = config.mpl
  if block.uda_rampup_steps <= 0:
    return jnp.asarray(block.uda_weight, jnp.float32)
  return block.uda_weight * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / block.uda_rampup_steps)


def loss(weak_logits, strong_logits, *, temperature, threshold):
  """(L_uda, the fraction of rows kept): masked CE of the strong view to the sharpened weak view."""
  targets = jax.lax.stop_gradient(
      confidence.pseudo_labels(weak_logits, hard=False, temperature=temperature, from_logits=True))
  mask = confidence.fixed_threshold_mask(targets, threshold)
  return confidence.consistency_cross_entropy(strong_logits, targets, mask), jnp.mean(mask)
