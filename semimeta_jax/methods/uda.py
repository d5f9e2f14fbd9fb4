"""UDA (Xie et al., "Unsupervised Data Augmentation for Consistency Training", NeurIPS 2020),
as USB's `algorithms/uda` defines it.

USB's code, read line by line: the weak probabilities p = softmax(f(weak)) (no
gradient) go to its PseudoLabelingHook with `use_hard_label=False, softmax=False`,
which returns them unchanged: USB's UDA does NOT sharpen (its T = 0.4 is passed and
never applied). The target is p itself, kept where max p >= p_cutoff (0.8). The paper's
sharpened target softmax(f(weak) / T) is `uda.sharpen=True`.
Training Signal Annealing (USB's `TSA`) on the supervised loss: a labeled row counts
only while its max probability is <= eta(t) = tau(t) (1 - 1/C) + 1/C, t = step /
num_train_steps, tau = t ('linear'), exp(5 (t - 1)) ('exp'), 1 - exp(-5 t) ('log'); with
'none' (USB's default) eta = 1 and every row counts. The supervised loss is the mean of
mask * CE over all B_l rows, as USB's.
  loss = mean(tsa_mask * CE(labeled)) + lambda_u * mean over B_u of mask * CE(f(strong), target).
"""

import functools

import jax.numpy as jnp
import ml_collections

from semimeta_jax import errors
from semimeta_jax import losses
from semimeta_jax.methods import base
from semimeta_jax.methods import confidence

NAME = 'uda'
TSA_SCHEDULES = ('none', 'linear', 'exp', 'log')


def config_blocks():
  """The `uda` block: USB's classic-CV settings."""
  return {NAME: ml_collections.ConfigDict({
      'p_cutoff': 0.8,  # Smallest max-probability of the weak view that is trained on.
      'lambda_u': 1.0,  # Weight of the consistency loss (USB's ulb_loss_ratio).
      'T': 0.4,  # Sharpening temperature, applied only with `sharpen` (USB never applies it).
      'sharpen': False,  # True: targets softmax(weak logits / T) (the paper); False: USB's code.
      'tsa_schedule': 'none',  # Training Signal Annealing: none | linear | exp | log.
  })}


def validate(config) -> None:
  """`uda.p_cutoff` in [0, 1], `uda.T` > 0, `uda.tsa_schedule` known, `uda.lambda_u` >= 0."""
  block = config[NAME]
  confidence.validate_common(config, NAME)
  confidence.validate_fraction(config, f'{NAME}.p_cutoff')
  errors.require(block.T > 0, f'{NAME}.T', block.T, 'must be > 0')
  errors.require(block.tsa_schedule in TSA_SCHEDULES, f'{NAME}.tsa_schedule', block.tsa_schedule,
                 f'expected one of {TSA_SCHEDULES}')


def tsa_threshold(schedule: str, step, num_train_steps: int, num_classes: int):
  """eta(t) of USB's `UDA.TSA`: the largest labeled max-probability still trained on."""
  if schedule == 'none':
    return jnp.ones((), jnp.float32)
  progress = jnp.asarray(step, jnp.float32) / num_train_steps
  if schedule == 'linear':
    tau = progress
  elif schedule == 'exp':
    tau = jnp.exp((progress - 1.0) * 5.0)
  elif schedule == 'log':
    tau = 1.0 - jnp.exp(-progress * 5.0)
  else:
    raise ValueError(f'uda.tsa_schedule={schedule!r}; expected one of {TSA_SCHEDULES}.')
  return tau * (1.0 - 1.0 / num_classes) + 1.0 / num_classes


def supervised(config, logits, labels, step, num_classes):
  """Mean over B_l of tsa_mask * CE: rows above eta(t) are left out (held constant)."""
  eta = tsa_threshold(config[NAME].tsa_schedule, step, config.num_train_steps, num_classes)
  mask = (jnp.max(confidence.probabilities(logits), axis=-1) <= eta).astype(jnp.float32)
  loss = jnp.mean(mask * losses.cross_entropy_per_example(logits, labels))
  return loss, {'tsa_threshold': eta, 'tsa_fraction': jnp.mean(mask)}


def make_targets(config, weak_logits, labeled_logits, unlabeled, state, pool_size):
  """The weak probabilities (sharpened only with `uda.sharpen`), masked at `p_cutoff`."""
  del labeled_logits, unlabeled, pool_size
  block = config[NAME]
  probs = confidence.probabilities(weak_logits)
  mask = confidence.fixed_threshold_mask(probs, block.p_cutoff)
  if block.sharpen:
    targets = confidence.pseudo_labels(weak_logits, hard=False, temperature=block.T, from_logits=True)
  else:
    targets = confidence.pseudo_labels(probs, hard=False, from_logits=False)
  return confidence.Targets(targets, mask, state, {})


def init_extra_state(config, *, num_train: int, num_classes: int):
  """UDA keeps no statistics: an empty entry."""
  del config, num_train, num_classes
  return {NAME: {}}


train_step = functools.partial(confidence.train_step, name=NAME, make_targets=make_targets,
                               supervised=supervised)

# USB's classic-CV configs (every dataset and label count): T 0.4 (unused), p_cutoff 0.8, no TSA.
PRESETS = confidence.usb_presets(
    NAME, {f'{NAME}.p_cutoff': 0.8, f'{NAME}.lambda_u': 1.0, f'{NAME}.T': 0.4, f'{NAME}.sharpen': False,
           f'{NAME}.tsa_schedule': 'none'})

METHOD = base.Method(
    name=NAME, train_step=train_step, uses_unlabeled=True, strong_view=confidence.strong_view,
    config_blocks=config_blocks, validate=validate, init_extra_state=init_extra_state,
    presets=PRESETS,
    describe=lambda config: (f'p_cutoff {config[NAME].p_cutoff}, lambda_u {config[NAME].lambda_u}, '
                             f'TSA {config[NAME].tsa_schedule}'
                             + (f', sharpened T {config[NAME].T}' if config[NAME].sharpen else '')))
