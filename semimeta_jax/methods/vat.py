"""Virtual Adversarial Training (Miyato et al., TPAMI 2018), and VAT+Ent.

The local distributional smoothness of an input x is KL(p(.|x) || p(.|x + r_adv)),
with r_adv the perturbation of L2 norm eps that changes the prediction most. To
second order KL(r) = r^T H r / 2 (H the Hessian at r = 0, where KL and its gradient
vanish), so r_adv is eps times H's dominant eigenvector, found by power iteration
with finite differences: from a random unit d, repeat
`vat.power_iterations` times d <- normalise(grad_r KL(xi d)) (grad = xi H d), then
r_adv = eps d. The clean prediction is held fixed (stop_gradient) throughout.
`vat.xi = 0` takes the finite difference's limit exactly, H d by forward-over-reverse
differentiation: in float32 the paper's xi = 1e-6 moves the logits of a small
network by less than their rounding (measured on the tests' 4-channel ConvLarge:
cosine to the exact H d between -0.9 and 0.98 per example, against > 0.99 at
xi = 1e-4), so the exact product is the faithful reading of the method there.

One training step:
  1. CE on the labeled batch (training mode; its forward updates the batch-norm
     running averages);
  2. the clean forward of the unlabeled batch, the power iteration and the
     perturbed forward, in training mode (batch statistics) without updating the
     running averages, as the official code (update_batch_stats=False). The three
     share one dropout mask, so the perturbation is the only difference between
     the clean and perturbed predictions;
  3. loss = CE + w(t) * KL(sg(p(x_u)) || p(x_u + r_adv))
            + `vat.entropy_weight` * mean entropy of p(x_u)   (VAT+Ent: weight 1).
The paper's weight on the VAT term is 1 without ramp-up (`consistency_weight=1`,
`consistency_rampup_steps=0`).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections

from semimeta_jax import errors
from semimeta_jax import losses
from semimeta_jax import schedules
from semimeta_jax.methods import base
from semimeta_jax.methods import common
from semimeta_jax.methods import options
from semimeta_jax.methods import sntg


def config_blocks():
  """The `vat` block: r_adv = epsilon * the direction found from a xi-sized probe."""
  return {'vat': ml_collections.ConfigDict({
      'epsilon': 6.0,  # L2 radius per example (official CIFAR-10 value, ZCA inputs).
      'xi': 1e-6,  # Finite-difference probe (paper); 0 = exact Hessian-vector product (float32-safe).
      'power_iterations': 1,
      'entropy_weight': 0.0,  # > 0: VAT+Ent, the entropy of the unlabeled predictions (paper: 1).
  })}


def validate(config) -> None:
  """The VAT fields: eps > 0, xi >= 0, at least one power iteration, entropy weight >= 0."""
  require, block = errors.require, config.vat
  require(block.epsilon > 0, 'vat.epsilon', block.epsilon, 'must be > 0')
  require(block.xi >= 0, 'vat.xi', block.xi, 'must be >= 0 (0 = exact Hessian-vector product)')
  require(isinstance(block.power_iterations, int) and block.power_iterations >= 1,
          'vat.power_iterations', block.power_iterations, 'must be an integer >= 1')
  require(block.entropy_weight >= 0, 'vat.entropy_weight', block.entropy_weight, 'must be >= 0')


def normalize(d: jax.Array) -> jax.Array:
  """Each example's perturbation scaled to unit L2 norm (a zero one stays zero)."""
  norms = jnp.sqrt(jnp.sum(jnp.square(d), axis=tuple(range(1, d.ndim)), keepdims=True))
  return d / jnp.maximum(norms, jnp.finfo(d.dtype).tiny)


def kl_to_clean(clean_logits: jax.Array, logits: jax.Array) -> jax.Array:
  """Mean over the batch of KL(softmax(clean) || softmax(logits)), the clean side constant."""
  return losses.kl_divergence(jax.nn.softmax(jax.lax.stop_gradient(losses.at_least_float32(clean_logits))),
                              logits)


def adversarial_direction(logits_fn, x, clean_logits, key, *, xi: float, power_iterations: int):
  """The unit direction of steepest KL increase at x, by power iteration.

  Args:
    logits_fn: `x -> logits`, the network as the step sees it (mode and dropout bound).
    x: [B, ...] inputs.
    clean_logits: logits_fn(x), held fixed.
    key: PRNG key of the random start.
    xi: static; the finite-difference probe size, or 0 for the exact Hessian-vector
      product. In float32, xi = 1e-6 (the paper's) moves the logits of a small
      network by less than their rounding, and the direction is mostly noise.
    power_iterations: static; number of power-iteration steps.

  Returns:
    [B, ...] directions, each of unit L2 norm (no gradient flows through them).
  """
  kl = lambda r: kl_to_clean(clean_logits, logits_fn(x + r))
  d = normalize(jax.random.normal(key, x.shape, x.dtype))
  for _ in range(power_iterations):
    if xi > 0:
      # The paper's finite difference: grad_r KL at r = xi d is xi H d (per example, times 1/B).
      h_d = jax.grad(kl)(xi * d)
    else:
      # Its xi -> 0 limit, exactly: the Hessian-vector product, forward over reverse.
      h_d = jax.jvp(jax.grad(kl), (jnp.zeros_like(x),), (d,))[1]
    d = normalize(jax.lax.stop_gradient(h_d))
  return d


def objective(params, state, batch, *, weight, config):
  """CE + w(t) * LDS (+ entropy) (+ SNTG on the labeled then the unlabeled features, clean target).

  Returns:
    (loss, (stats, supervised, vat, entropy, clean logits, *SNTG's aux tail)).
  """
  labeled, x_u = batch['labeled'], batch['unlabeled']['image']
  logits_l, features_l, stats = sntg.student_forward(
      config, state, params, labeled['image'], state.batch_stats, state.step_key(common.DROPOUT_LABELED))
  supervised = losses.cross_entropy(logits_l, labeled['label'])
  dropout_key = state.step_key(common.DROPOUT_UNLABELED)
  # Training mode without keeping the running-average update (the clean, probe and
  # perturbed forwards would otherwise count the unlabeled batch three times).
  logits_fn = lambda p, x: common.train_forward(state, p, x, stats, dropout_key)[0]
  clean, features_u, _ = sntg.student_forward(config, state, params, x_u, stats, dropout_key)
  d = adversarial_direction(functools.partial(logits_fn, params), x_u, clean, state.step_key(common.NOISE),
                            xi=config.vat.xi, power_iterations=config.vat.power_iterations)
  vat_loss = kl_to_clean(clean, logits_fn(params, x_u + config.vat.epsilon * d))
  entropy = losses.entropy(jax.nn.softmax(losses.at_least_float32(clean)))
  loss, sntg_aux = sntg.regularize(
      supervised + weight * vat_loss + config.vat.entropy_weight * entropy, config, state, weight,
      sntg.joined(features_l, features_u), jnp.concatenate([logits_l, clean]), labeled['label'])
  return loss, (stats, supervised, vat_loss, entropy, clean, *sntg_aux)


def train_step(state, batch, *, config, num_classes):
  """One VAT (+Ent) update. Pure: (state, batch) -> (state, metrics)."""
  del num_classes  # The labels carry it.
  lr = options.learning_rate_schedule(config)(state.step)
  weight = schedules.consistency_weight_schedule(config)(state.step)
  loss_fn = functools.partial(objective, state=state, batch=batch, weight=weight, config=config)
  (loss, (stats, supervised, vat_loss, entropy, clean, *sntg_aux)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  metrics = {
      'loss': loss,
      'supervised_loss': supervised,
      'consistency_loss': vat_loss,
      'entropy_loss': entropy,
      'learning_rate': lr,
      'consistency_weight': weight,
      **sntg.metrics(sntg_aux),
  }
  return common.finish_step(state, grads, stats, metrics,
                            scored=[('unlabeled_accuracy', clean, batch['unlabeled'])])


# Miyato et al.: weight 1 without ramp, one power iteration; VAT+Ent adds the entropy at weight 1.
# CIFAR-10: eps = 6.0 (ZCA-normalised inputs) with the paper's xi = 1e-6. Digits: eps = 2.0,
# MNIST's radius (standardised 8x8 digits have about an MNIST digit's L2 norm), and xi -> 0 taken
# exactly (xi = 0: the paper's 1e-6 is below float32 rounding on this small network, see above).
_DIGITS = {'consistency_weight': 1.0, 'consistency_rampup_steps': 0, 'vat.epsilon': 2.0, 'vat.xi': 0.0}
_CIFAR10 = {'consistency_weight': 1.0, 'consistency_rampup_steps': 0, 'vat.epsilon': 6.0, 'vat.xi': 1e-6}
PRESETS = {
    'digits': {'vat': _DIGITS, 'vat_ent': {**_DIGITS, 'vat.entropy_weight': 1.0}},
    'cifar10': {'vat': _CIFAR10, 'vat_ent': {**_CIFAR10, 'vat.entropy_weight': 1.0}},
}

METHOD = base.Method(
    name='vat', train_step=train_step, uses_unlabeled=True, config_blocks=config_blocks,
    renamed_fields={'vat_epsilon': 'vat.epsilon', 'vat_xi': 'vat.xi',
                    'vat_power_iterations': 'vat.power_iterations',
                    'entropy_weight': 'vat.entropy_weight'},
    validate=validate,
    presets=PRESETS)
