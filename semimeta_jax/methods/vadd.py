"""VAT + Virtual Adversarial Dropout (Park et al., "Adversarial Dropout for Supervised and
Semi-supervised Learning", AAAI 2018).

Virtual adversarial dropout drops the units of the pooled features (ConvLarge's 128)
that change the prediction most. With f(x; m) the classifier's head applied to
m * h (h the globally pooled features, `params['head']['fc']`), starting from the
full mask m = 1:
  1. g = d KL(f(x; m) || f(x)) / d m at m = 1, everything else held fixed;
  2. to first order, flipping entry i changes the divergence by g_i (m'_i - m_i) =
     g_i (1 - 2 m_i): a 1 -> 0 flip raises it when g_i < 0 (a 0 -> 1 flip when
     g_i > 0). Among the entries whose flip raises it, the k = int(`vadd.delta` * D)
     of largest |g_i| are flipped (fewer when fewer qualify): the maximiser of the
     linearised divergence over masks within Hamming distance k;
  3. the mask is rescaled per example to m' D / sum(m'), so that its mean stays 1 and
     the kept units carry the dropped ones' share, as the authors' `flipping_algorithm`.
The authors (sungraepark/Adversarial-Dropout, `adv_training.py`) compare the
adversarially masked prediction of a second stochastic forward (their `ul_x_2`: its
own input perturbation and dropout; here `augment.perturb` and a dropout key of its
own) with the prediction f(x) of the first: at m = 1 a forward compared with itself
has KL = 0 and gradient 0, so the second view is what makes g informative. Where the
target is held fixed, as theirs:
  * the mask search differentiates with respect to the mask only (their
    `tf.stop_gradient(tf.gradients(dist, [init_mask]))`): no parameter gradient;
  * the loss term lambda(t) KL(f(x) || f(x; m_adv)) is differentiated through BOTH
    sides: their `virtual_adversarial_dropout_loss` applies no stop_gradient to f(x)
    (unlike their VAT term, whose clean logits are stopped).
The pooled features below the mask do not depend on it, so one forward of the second
view serves the search and the loss; only the head is re-applied.

One step: VAT's objective (`vat.objective`: CE + w LDS + `vat.entropy_weight` entropy,
the `vat.*` block) with w = `consistency_weight` held constant (no ramp-up), plus
lambda(t) times the VAdD term, lambda(t) = `vadd.weight` times the consistency ramp-up
r(t) in [0, 1] (`consistency_rampup`, `consistency_rampup_steps`). This is the authors'
combined loss (branch `experiments---TF1.1.0`, train_semisup.py, method 'VAT+VAdD-KL':
`loss = nll_loss + lamb * additional_loss + vat_loss + ent_loss`, with only `lamb`
ramped by their sigmoid). Their code also ramps the learning rate up with the same
sigmoid, which the shared schedule here does not.
Ramping the VAT term with lambda, as this module once did, leaves the first steps to the
cross-entropy and the unramped entropy term alone, which can commit the unlabeled
predictions to wrong classes before VAT weighs in: on digits with 30 labels (seeds 5-7,
1000 steps) that form ended at 7.00, 9.67 and 25.33% test error, the unlabeled accuracy of
the last run stuck at 0.74 from step 300 on; the authors' form ended at 5.00, 4.33 and 4.00%.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections

from semimeta_jax import errors
from semimeta_jax import losses
from semimeta_jax.methods import augment
from semimeta_jax.methods import base
from semimeta_jax.methods import common
from semimeta_jax.methods import options
from semimeta_jax.methods import sntg
from semimeta_jax.methods import vat

# The perturbation sub-key of the second view (VAT's own forwards see the pipeline's view).
SECOND_VIEW = 1


def config_blocks():
  """The `vadd` block: lambda_max and the fraction of feature units flipped."""
  return {'vadd': ml_collections.ConfigDict({
      'weight': 1.0,  # lambda_max (the authors' README command).
      'delta': 0.05,  # Fraction of the pooled feature units flipped (k = int(delta * D)).
  })}


def validate(config) -> None:
  """The `vadd` fields, VAT's and the perturbation fields of the second view.

  Raises:
    errors.ConfigError: naming the field.
  """
  vat.validate(config)
  augment.validate(config)
  block = config.vadd
  errors.require(block.weight >= 0, 'vadd.weight', block.weight, 'must be >= 0')
  errors.require(0 < block.delta < 1, 'vadd.delta', block.delta,
                 'must be in (0, 1) (the fraction of feature units flipped; the paper: 0.05)')


def kl_with_logits(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
  """Mean over the batch of KL(softmax(p) || softmax(q)); gradients reach both sides."""
  log_p = jax.nn.log_softmax(losses.at_least_float32(p_logits))
  log_q = jax.nn.log_softmax(losses.at_least_float32(q_logits))
  return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))


def masked_head(fc_params, features: jax.Array, mask: jax.Array) -> jax.Array:
  """The classifier's dense layer on `mask * features` (`layers.PooledClassifier`'s 'fc')."""
  return jnp.dot(mask * features, fc_params['kernel']) + fc_params['bias']


def flip(mask: jax.Array, grad: jax.Array, num_flips: int) -> jax.Array:
  """The binary mask with the `num_flips` most divergence-raising entries of each row flipped.

  Flipping entry i changes the linearised divergence by grad_i (1 - 2 mask_i); only
  entries where that gain is > 0 are flipped, the largest gains first.

  Args:
    mask: [B, D] binary mask.
    grad: [B, D] gradient of the divergence with respect to the mask.
    num_flips: static; at most this many flips per row.

  Returns:
    [B, D] binary mask (not rescaled).
  """
  if num_flips == 0:
    return mask
  gain = grad * (1.0 - 2.0 * mask)
  top_gain, top_index = jax.lax.top_k(gain, num_flips)
  chosen = jnp.sum(jax.nn.one_hot(top_index, mask.shape[-1], dtype=mask.dtype)
                   * (top_gain > 0)[..., None].astype(mask.dtype), axis=-2)
  return jnp.where(chosen > 0, 1.0 - mask, mask)


def rescale(mask: jax.Array) -> jax.Array:
  """Each row times D / its sum: the mask's mean stays 1 (the authors' normalisation)."""
  dim = mask.shape[-1]
  return mask * (dim / jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0))


def adversarial_mask(head_fn, target_logits: jax.Array, features: jax.Array, num_flips: int):
  """The virtual adversarial dropout mask, rescaled, and the gradient it came from.

  Args:
    head_fn: `mask -> logits` of the masked prediction f(x; mask).
    target_logits: f(x), held fixed.
    features: [B, D] the masked features (their shape and dtype are the mask's).
    num_flips: static; k, the most units flipped per example.

  Returns:
    (mask [B, D], grad [B, D]); neither carries a gradient.
  """
  ones = jnp.ones_like(features)
  target = jax.lax.stop_gradient(target_logits)
  divergence = lambda mask: kl_with_logits(head_fn(mask), target)  # KL(f(x; m) || f(x)).
  grad = jax.lax.stop_gradient(jax.grad(divergence)(ones))
  return rescale(flip(ones, grad, num_flips)), grad


def num_flips(config, dim: int) -> int:
  """k = int(`vadd.delta` * D), as the authors' `change_limit`."""
  return int(config.vadd.delta * dim)


def objective(params, state, batch, *, weight, lam, config):
  """VAT's loss at weight `weight` plus `lam` KL(f(x_u) || f(x_u; m_adv)).

  Returns:
    (loss, (stats, supervised, vat, entropy, clean logits, VAdD term, flipped units per example)).
  """
  loss, (stats, supervised, vat_loss, entropy, clean, *_) = vat.objective(
      params, state, batch, weight=weight, config=config)
  second_view = augment.from_config(config)(state.step_key(common.NOISE, SECOND_VIEW),
                                            batch['unlabeled']['image'])
  # Training mode from the labeled forward's statistics, without keeping an update (as VAT's).
  _, features, _ = common.train_forward_with_features(state, params, second_view, stats,
                                                      state.step_key(common.DROPOUT_TEACHER))
  fc_params = params['head']['fc']
  head_fn = functools.partial(masked_head, jax.lax.stop_gradient(fc_params),
                              jax.lax.stop_gradient(features))
  mask, _ = adversarial_mask(head_fn, clean, features, num_flips(config, features.shape[-1]))
  vadd_loss = kl_with_logits(clean, masked_head(fc_params, features, mask))
  flipped = jnp.mean(jnp.sum(mask == 0, axis=-1).astype(jnp.float32))
  return loss + lam * vadd_loss, (stats, supervised, vat_loss, entropy, clean, vadd_loss, flipped)


def train_step(state, batch, *, config, num_classes):
  """One VAT + VAdD update. Pure: (state, batch) -> (state, metrics)."""
  del num_classes  # The labels carry it.
  lr = options.learning_rate_schedule(config)(state.step)
  # The VAT term at its full weight from the first step; only lambda is ramped (the authors' loss).
  weight = jnp.asarray(config.consistency_weight, jnp.float32)
  lam = config.vadd.weight * sntg.rampup(config, state.step)
  loss_fn = functools.partial(objective, state=state, batch=batch, weight=weight, lam=lam, config=config)
  (loss, (stats, supervised, vat_loss, entropy, clean, vadd_loss, flipped)), grads = (
      jax.value_and_grad(loss_fn, has_aux=True)(state.params))
  metrics = {
      'loss': loss,
      'supervised_loss': supervised,
      'consistency_loss': vat_loss,
      'entropy_loss': entropy,
      'vadd_loss': vadd_loss,
      'vadd_weight': lam,
      'vadd_flipped_units': flipped,
      'learning_rate': lr,
      'consistency_weight': weight,
  }
  return common.finish_step(state, grads, stats, metrics,
                            scored=[('unlabeled_accuracy', clean, batch['unlabeled'])])


def describe(config) -> str:
  """lambda_max, delta and VAT's radius in the run plan."""
  return (f'lambda_max={config.vadd.weight}, delta={config.vadd.delta}, '
          f'vat.epsilon={config.vat.epsilon}, entropy_weight={config.vat.entropy_weight}')


# Park et al. (CIFAR-10, ConvLarge): lambda_max 1, delta 0.05 (6 of 128 units), input noise 0.15,
# 2-pixel translations, entropy term on; lambda ramped by the sigmoid over 80 of 300 epochs
# (31,250 steps of 128 of 50,000 images). The VAT term at weight 1 without ramp-up, eps 8 on
# CIFAR-10 (their combined run's radius; VAT's own preset keeps Miyato et al.'s 6). Digits:
# VAT's digits preset (eps 2, exact Hessian-vector product), the ramp of lambda over 270 of the
# 1000 steps (80 / 300) and the Pi-model's 1-pixel shifts.
_SHARED = {'consistency_weight': 1.0, 'consistency_rampup': 'sigmoid', 'vat.entropy_weight': 1.0,
           'vadd.weight': 1.0, 'vadd.delta': 0.05}
PRESETS = {
    'digits': {'vat_vadd': {**_SHARED, 'consistency_rampup_steps': 270, 'vat.epsilon': 2.0,
                            'vat.xi': 0.0, 'perturb.max_translation': 1}},
    'cifar10': {'vat_vadd': {**_SHARED, 'consistency_rampup_steps': 31_250, 'vat.epsilon': 8.0,
                             'vat.xi': 1e-6, 'perturb.max_translation': 2,
                             'perturb.noise_std': 0.15}},
}

METHOD = base.Method(name='vat_vadd', train_step=train_step, uses_unlabeled=True,
                     config_blocks=config_blocks, validate=validate, presets=PRESETS,
                     describe=describe)
