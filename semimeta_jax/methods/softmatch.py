"""SoftMatch (Chen et al., "SoftMatch: Addressing the Quantity-Quality Trade-off in
Semi-supervised Learning", ICLR 2023), as USB's `algorithms/softmatch` defines it.

With p = softmax(f(weak)) (no gradient) over the whole global batch, m = `ema_p` (0.999):
  1. uniform distribution alignment (USB's DistAlignEMAHook, registered and called
     unconditionally: USB's `dist_align` flag is read by nothing): p_model is the first
     batch's mean p (USB's `None` start: a flag in the state), then its EMA; the
     aligned p~ = SumNorm(p * (1/C + 1e-6) / (p_model + 1e-6)). With
     `dist_uniform=False` the target is the EMA of the labeled rows' mean probability;
  2. the Gaussian's statistics take this batch first: mu <- m mu + (1 - m) mean(max p~),
     var <- m var + (1 - m) var_unbiased(max p~) (start 1/C and 1). With `per_class`,
     each class's over the rows whose aligned argmax is that class (classes with fewer
     than two rows contribute mean 0 and variance 1, as USB's loop; USB's per-class
     initialisation reads `self.args`, which its hook does not have, so USB cannot run it);
  3. weight = exp(-min(max p~ - mu, 0)^2 / (2 var / n_sigma^2)), n_sigma = 2: 1 above
     the mean, a truncated Gaussian below it.
The targets come from the UNALIGNED weak logits (USB passes `logits=logits_x_ulb_w`):
their argmax (`hard_label`) or softmax(logits / T).
  loss = CE(labeled) + lambda_u * mean over B_u of weight * CE(f(strong), target).
"""

import functools

import jax.numpy as jnp
import ml_collections

from semimeta_jax import errors
from semimeta_jax.methods import base
from semimeta_jax.methods import confidence

NAME = 'softmatch'


def config_blocks():
  """The `softmatch` block: USB's classic-CV settings."""
  return {NAME: ml_collections.ConfigDict({
      'lambda_u': 1.0,  # Weight of the consistency loss (USB's ulb_loss_ratio).
      'ema_p': 0.999,  # Momentum of p_model (and p_target), mu and var.
      'n_sigma': 2.0,  # The Gaussian's width: var / n_sigma^2.
      'dist_uniform': True,  # Align to the uniform distribution; False: to the labeled EMA.
      'per_class': False,  # mu and var per predicted class.
      'hard_label': True,  # Argmax targets; False: softmax(weak logits / T).
      'T': 0.5,  # Temperature of soft targets.
  })}


def validate(config) -> None:
  """`softmatch.ema_p` in [0, 1), `n_sigma` > 0, `T` > 0, `lambda_u` >= 0."""
  block = config[NAME]
  confidence.validate_common(config, NAME)
  confidence.validate_fraction(config, f'{NAME}.ema_p', upper_open=True)
  errors.require(block.n_sigma > 0, f'{NAME}.n_sigma', block.n_sigma, 'must be > 0')
  errors.require(block.T > 0, f'{NAME}.T', block.T, 'must be > 0')


def init_extra_state(config, *, num_train: int, num_classes: int):
  """Alignment unset, mu = 1/C and var = 1 (per class with `softmatch.per_class`)."""
  del num_train
  shape = (num_classes,) if config[NAME].per_class else ()
  return {NAME: {'alignment': confidence.init_distribution_alignment(num_classes),
                 'mu': jnp.full(shape, 1.0 / num_classes, jnp.float32),
                 'var': jnp.ones(shape, jnp.float32)}}


def _mean_and_unbiased_variance(values, weight):
  """Mean and variance (ddof 1) of the `values` of weight 1; 0 and 1 with fewer than two."""
  count = jnp.sum(weight, axis=-1)
  enough = count > 1
  mean = jnp.sum(weight * values, axis=-1) / jnp.where(enough, count, 1.0)
  variance = jnp.sum(weight * jnp.square(values - mean[..., None]), axis=-1) / jnp.where(enough, count - 1, 1.0)
  return jnp.where(enough, mean, 0.0), jnp.where(enough, variance, 1.0)


def update_gaussian(mu, var, max_probs, predicted, *, momentum, per_class: bool):
  """USB's SoftMatchWeightingHook.update: the EMAs of the mean and unbiased variance of max p."""
  if per_class:
    members = (predicted[None, :] == jnp.arange(mu.shape[0])[:, None]).astype(jnp.float32)
    batch_mu, batch_var = _mean_and_unbiased_variance(max_probs[None, :], members)
  else:
    batch_mu, batch_var = jnp.mean(max_probs), jnp.var(max_probs, ddof=1)
  return confidence.ema(mu, batch_mu, momentum), confidence.ema(var, batch_var, momentum)


def truncated_gaussian_weight(max_probs, mu, var, n_sigma):
  """exp(-min(max p - mu, 0)^2 / (2 var / n_sigma^2)): 1 at or above mu."""
  return jnp.exp(-jnp.square(jnp.minimum(max_probs - mu, 0.0)) / (2.0 * var / n_sigma ** 2))


def make_targets(config, weak_logits, labeled_logits, unlabeled, state, pool_size):
  """Align, update the Gaussian with this batch, weigh; targets from the unaligned logits."""
  del unlabeled, pool_size
  block = config[NAME]
  probs = confidence.probabilities(weak_logits)
  aligned, alignment = confidence.distribution_alignment(
      state['alignment'], probs, confidence.probabilities(labeled_logits), momentum=block.ema_p,
      uniform=block.dist_uniform)
  max_probs, predicted = jnp.max(aligned, axis=-1), jnp.argmax(aligned, axis=-1)
  mu, var = update_gaussian(state['mu'], state['var'], max_probs, predicted, momentum=block.ema_p,
                            per_class=block.per_class)
  row_mu, row_var = (mu[predicted], var[predicted]) if block.per_class else (mu, var)
  weight = truncated_gaussian_weight(max_probs, row_mu, row_var, block.n_sigma)
  targets = confidence.pseudo_labels(weak_logits, hard=block.hard_label, temperature=block.T,
                                     from_logits=True)
  metrics = {'gaussian_mean': jnp.mean(mu), 'gaussian_variance': jnp.mean(var)}
  return confidence.Targets(targets, weight, {'alignment': alignment, 'mu': mu, 'var': var}, metrics)


train_step = functools.partial(confidence.train_step, name=NAME, make_targets=make_targets)

# USB's classic-CV configs (every dataset and label count): uniform alignment, ema_p 0.999,
# n_sigma 2, one Gaussian, hard labels, lambda_u 1.
PRESETS = confidence.usb_presets(
    NAME, {f'{NAME}.lambda_u': 1.0, f'{NAME}.ema_p': 0.999, f'{NAME}.n_sigma': 2.0,
           f'{NAME}.dist_uniform': True, f'{NAME}.per_class': False, f'{NAME}.hard_label': True})

METHOD = base.Method(
    name=NAME, train_step=train_step, uses_unlabeled=True, strong_view=confidence.strong_view,
    config_blocks=config_blocks, validate=validate, init_extra_state=init_extra_state,
    presets=PRESETS,
    describe=lambda config: (f'lambda_u {config[NAME].lambda_u}, n_sigma {config[NAME].n_sigma}, '
                             f'ema_p {config[NAME].ema_p}'
                             + (', per class' if config[NAME].per_class else '')))
