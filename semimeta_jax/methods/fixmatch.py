"""FixMatch (Sohn et al., "FixMatch: Simplifying Semi-Supervised Learning with Consistency and
Confidence", NeurIPS 2020), as USB's `algorithms/fixmatch` defines it.

The weak view's prediction p = softmax(f(weak)) (no gradient) gives the target: its
argmax (`fixmatch.hard_label`, USB's default) or, with soft labels, p itself: USB
passes the probabilities to its PseudoLabelingHook with `softmax=False`, so T is
never applied (`fixmatch.T` is kept as USB's field and read by nothing). Rows whose
max p reaches `p_cutoff` (0.95) count:
  loss = CE(labeled) + lambda_u * mean over B_u of mask * CE(f(strong), target),
lambda_u = 1 (USB's `ulb_loss_ratio`), the unlabeled batch uratio = 7 times the
labeled one. The step is `confidence.train_step` (one joined forward; the module's
docstring).
"""

import functools

import ml_collections

from semimeta_jax import errors
from semimeta_jax.methods import base
from semimeta_jax.methods import confidence

NAME = 'fixmatch'


def config_blocks():
  """The `fixmatch` block: USB's classic-CV settings."""
  return {NAME: ml_collections.ConfigDict({
      'p_cutoff': 0.95,  # Smallest max-probability of the weak view that is trained on.
      'lambda_u': 1.0,  # Weight of the consistency loss (USB's ulb_loss_ratio).
      'hard_label': True,  # Argmax targets; False: the weak probabilities themselves.
      'T': 0.5,  # USB's field; its FixMatch never applies it (soft targets are the probabilities).
  })}


def validate(config) -> None:
  """`fixmatch.p_cutoff` in [0, 1], `fixmatch.lambda_u` >= 0, `fixmatch.T` > 0."""
  confidence.validate_common(config, NAME)
  confidence.validate_fraction(config, f'{NAME}.p_cutoff')
  errors.require(config[NAME].T > 0, f'{NAME}.T', config[NAME].T, 'must be > 0')


def make_targets(config, weak_logits, labeled_logits, unlabeled, state, pool_size):
  """Argmax (or probability) targets of the weak view, masked at `p_cutoff`."""
  del labeled_logits, unlabeled, pool_size
  block = config[NAME]
  probs = confidence.probabilities(weak_logits)
  mask = confidence.fixed_threshold_mask(probs, block.p_cutoff)
  targets = confidence.pseudo_labels(probs, hard=block.hard_label, from_logits=False)
  return confidence.Targets(targets, mask, state, {})


def init_extra_state(config, *, num_train: int, num_classes: int):
  """FixMatch keeps no statistics: an empty entry."""
  del config, num_train, num_classes
  return {NAME: {}}


train_step = functools.partial(confidence.train_step, name=NAME, make_targets=make_targets)


# USB's classic-CV configs (every dataset and label count): p_cutoff 0.95, lambda_u 1, hard labels.
PRESETS = confidence.usb_presets(
    NAME, {f'{NAME}.p_cutoff': 0.95, f'{NAME}.lambda_u': 1.0, f'{NAME}.hard_label': True})

METHOD = base.Method(
    name=NAME, train_step=train_step, uses_unlabeled=True, strong_view=confidence.strong_view,
    config_blocks=config_blocks, validate=validate, init_extra_state=init_extra_state,
    presets=PRESETS,
    describe=lambda config: f'p_cutoff {config[NAME].p_cutoff}, lambda_u {config[NAME].lambda_u}')
