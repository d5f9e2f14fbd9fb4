"""ADA-Net (Wang, Li & Van Gool, "Semi-Supervised Learning by Augmented Distribution Alignment",
ICCV 2019), and ADA-Net+fast-SWA with the `fast_swa` option.

ADA-Net aligns the labeled and unlabeled distributions two ways: it trains on
interpolations between them (cross-set mix-up), and it makes their features
indistinguishable to an adversary. One training step, as the authors' code
(qinenergy/adanet, convlarge/train_cifar.py) does it:
  1. Pseudo-labels of the unlabeled batch from an evaluation-mode forward (running
     batch-norm averages, no dropout, no update of the averages): q = softmax(f(x_u)),
     or its argmax as a one-hot with `adanet.hard_pseudo_labels`; held fixed.
  2. Labeled example i is paired with unlabeled example i and mixed with its own
     lambda_i ~ Beta(a, a) (a = `adanet.mixup_alpha`, the paper's 1):
     x = lambda x_l + (1 - lambda) x_u, y = lambda onehot(y_l) + (1 - lambda) q.
  3. One training-mode forward of the mixed batch (it alone updates the batch-norm
     averages) gives logits and pooled features h.
  4. loss = mean_i lambda_i CE(y_i, logits_i)
            + `adanet.alignment_weight` * mean_i CE([lambda_i, 1 - lambda_i], D(R(h_i))),
     D a discriminator MLP (width-width-2, ReLU; the paper's 1024-1024-2) and R the
     gradient-reversal layer: the identity forward, -c times the gradient backward,
     c = 2 / (1 + exp(-10 k)) - 1 with k = step / num_train_steps the progress of
     training. The discriminator learns to tell how much of each example is
     labeled; the features learn to hide it.

The discriminator's parameters and its optimizer state live in
`TrainState.extra['adanet']` (built by `init_model_state`). The authors train both
networks with one optimizer over all variables; here the discriminator follows the
run's own optimizer rule and schedule (`options.optimizer`) with its own state: the
same updates as one optimizer over both (the rule acts per parameter), while the
classifier's parameters, optimizer state, averages and evaluation stay the
classifier's alone.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from semimeta_jax import errors
from semimeta_jax import losses
from semimeta_jax.methods import base
from semimeta_jax.methods import common
from semimeta_jax.methods import options

NAME = 'adanet'


def config_blocks():
  """The `adanet` block."""
  return {NAME: ml_collections.ConfigDict({
      'discriminator_width': 1024,  # Width of each of the discriminator's two hidden layers.
      'alignment_weight': 1.0,  # Weight of the discriminator's loss (the authors': 1).
      'mixup_alpha': 1.0,  # lambda ~ Beta(alpha, alpha); the paper's Beta(1, 1) is uniform.
      'hard_pseudo_labels': False,  # One-hot argmax pseudo-labels (the code's --one_hot) instead of soft.
  })}


def validate(config) -> None:
  """The `adanet` fields, and labeled and unlabeled batches of one size (they are paired).

  Raises:
    errors.ConfigError: naming the field.
  """
  block, require = config.adanet, errors.require
  require(isinstance(block.discriminator_width, int) and block.discriminator_width >= 1,
          'adanet.discriminator_width', block.discriminator_width, 'must be a positive integer')
  require(block.alignment_weight >= 0, 'adanet.alignment_weight', block.alignment_weight, 'must be >= 0')
  require(block.mixup_alpha > 0, 'adanet.mixup_alpha', block.mixup_alpha, 'must be > 0')
  require(config.unlabeled_batch_size == config.labeled_batch_size, 'unlabeled_batch_size',
          config.unlabeled_batch_size,
          f'adanet pairs every labeled example with one unlabeled example: it must equal '
          f'labeled_batch_size={config.labeled_batch_size}')


class Discriminator(nn.Module):
  """The alignment discriminator: two ReLU layers of `width`, then 2 logits.

  Glorot-uniform kernels and zero biases, TensorFlow's `tf.layers.dense` defaults
  that the authors' discriminator has.
  """

  width: int

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    dense = functools.partial(nn.Dense, kernel_init=nn.initializers.xavier_uniform(),
                              dtype=jnp.float32)
    x = nn.relu(dense(self.width, name='hidden1')(features))
    x = nn.relu(dense(self.width, name='hidden2')(x))
    return dense(2, name='logits')(x)


@jax.custom_vjp
def reverse_gradient(x: jax.Array, coefficient: jax.Array) -> jax.Array:
  """The identity forward; backward, the incoming gradient times -coefficient.

  `coefficient` receives no gradient (it is a schedule, not a parameter).
  """
  del coefficient
  return x


def _reverse_forward(x, coefficient):
  return x, coefficient


def _reverse_backward(coefficient, cotangent):
  return -coefficient * cotangent, jnp.zeros_like(coefficient)


reverse_gradient.defvjp(_reverse_forward, _reverse_backward)


def reversal_coefficient(step, num_train_steps: int) -> jax.Array:
  """c = 2 / (1 + exp(-10 k)) - 1 at progress k = step / num_train_steps (0 at the start, -> 1)."""
  progress = jnp.asarray(step, jnp.float32) / num_train_steps
  return 2.0 / (1.0 + jnp.exp(-10.0 * progress)) - 1.0


def init_model_state(config, *, model, image_shape, rng, params, batch_stats, num_classes):
  """{'adanet': {'params', 'opt_state'}}: the discriminator on the classifier's pooled features."""
  del model, image_shape, batch_stats, num_classes
  feature_dim = params['head']['fc']['kernel'].shape[0]
  discriminator = Discriminator(config.adanet.discriminator_width)
  disc_params = discriminator.init(rng, jnp.zeros((1, feature_dim), jnp.float32))['params']
  return {NAME: {'params': disc_params, 'opt_state': options.optimizer(config).init(disc_params)}}


def pseudo_labels(state, params, unlabeled_images, *, num_classes: int, hard: bool):
  """The fixed targets of the unlabeled batch: softmax (or its one-hot argmax), evaluation mode."""
  logits = losses.at_least_float32(common.eval_forward(state, params, unlabeled_images))
  probs = jax.nn.softmax(logits)
  if hard:
    probs = jax.nn.one_hot(jnp.argmax(probs, axis=-1), num_classes, dtype=probs.dtype)
  return jax.lax.stop_gradient(probs), jax.lax.stop_gradient(logits)


def cross_set_mixup(labeled_images, labels, unlabeled_images, targets, lam):
  """(x, y): lambda_i (x_l, onehot(y_l)) + (1 - lambda_i) (x_u, q) for each pair i."""
  lam_images = lam.reshape((-1,) + (1,) * (labeled_images.ndim - 1)).astype(labeled_images.dtype)
  images = lam_images * labeled_images + (1.0 - lam_images) * unlabeled_images
  one_hot = jax.nn.one_hot(labels, targets.shape[-1], dtype=targets.dtype)
  return images, lam[:, None] * one_hot + (1.0 - lam[:, None]) * targets


def soft_cross_entropy_per_example(logits, targets):
  """-sum_c targets_c log softmax(logits)_c, per example."""
  return -jnp.sum(targets * jax.nn.log_softmax(losses.at_least_float32(logits)), axis=-1)


def objective(trainable, state, batch, lam, *, coefficient, num_classes, config):
  """The lambda-weighted cross-entropy on the mixed batch plus the reversed alignment loss.

  Args:
    trainable: {'classifier': params, 'discriminator': params}, both differentiated.
    state: the TrainState (batch statistics, keys).
    batch: {'labeled': {'image', 'label'}, 'unlabeled': {'image'}}, of one size.
    lam: [B] mixing weights.
    coefficient: the gradient-reversal coefficient c.
    num_classes: width of the targets.
    config: the run configuration.

  Returns:
    (loss, (batch statistics, classification loss, alignment loss, pseudo-label logits,
    mixed logits)).
  """
  params = trainable['classifier']
  labeled, unlabeled = batch['labeled'], batch['unlabeled']
  targets, pseudo_logits = pseudo_labels(state, params, unlabeled['image'], num_classes=num_classes,
                                         hard=config.adanet.hard_pseudo_labels)
  images, mixed_targets = cross_set_mixup(labeled['image'], labeled['label'], unlabeled['image'],
                                          targets, lam)
  logits, features, stats = common.train_forward_with_features(
      state, params, images, state.batch_stats, state.step_key(common.DROPOUT_UNLABELED))
  classification = jnp.mean(lam * soft_cross_entropy_per_example(logits, mixed_targets))
  discriminator = Discriminator(config.adanet.discriminator_width)
  disc_logits = discriminator.apply({'params': trainable['discriminator']},
                                    reverse_gradient(losses.at_least_float32(features), coefficient))
  alignment = jnp.mean(soft_cross_entropy_per_example(disc_logits, jnp.stack([lam, 1.0 - lam], axis=-1)))
  loss = classification + config.adanet.alignment_weight * alignment
  return loss, (stats, classification, alignment, pseudo_logits, logits)


def mixing_weights(state, batch_size: int, alpha: float) -> jax.Array:
  """lambda_i ~ Beta(alpha, alpha), one per pair, from this step's key."""
  return jax.random.beta(state.step_key(common.MIXUP), alpha, alpha, (batch_size,), jnp.float32)


def train_step(state, batch, *, config, num_classes):
  """One ADA-Net update of the classifier and the discriminator. Pure: (state, batch) -> (state, metrics).

  Raises:
    ValueError: if the state keeps no discriminator (build it with `methods.init_train_state`).
  """
  if NAME not in state.extra:
    raise ValueError('ADA-Net needs a TrainState with its discriminator (build it with '
                     'methods.init_train_state).')
  disc = state.extra[NAME]
  lam = mixing_weights(state, batch['labeled']['image'].shape[0], config.adanet.mixup_alpha)
  coefficient = reversal_coefficient(state.step, config.num_train_steps)
  loss_fn = functools.partial(objective, state=state, batch=batch, lam=lam, coefficient=coefficient,
                              num_classes=num_classes, config=config)
  (loss, (stats, classification, alignment, pseudo_logits, _)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)({'classifier': state.params, 'discriminator': disc['params']})
  updates, disc_opt_state = options.optimizer(config).update(grads['discriminator'], disc['opt_state'],
                                                             disc['params'])
  new_disc = {'params': optax.apply_updates(disc['params'], updates), 'opt_state': disc_opt_state}
  metrics = {
      'loss': loss,
      'supervised_loss': classification,
      'alignment_loss': alignment,
      'reversal_coefficient': coefficient,
      'mixing_weight': jnp.mean(lam),
      'learning_rate': options.learning_rate_schedule(config)(state.step),
      'discriminator_grad_norm': optax.tree.norm(grads['discriminator']),
  }
  new_state, metrics = common.finish_step(
      state, grads['classifier'], stats, metrics,
      scored=[('pseudo_label_accuracy', pseudo_logits, batch['unlabeled'])])
  return new_state.replace(extra=dict(new_state.extra, **{NAME: new_disc})), metrics


def describe(config) -> str:
  """ADA-Net's settings in the run plan."""
  block = config.adanet
  labels = 'hard' if block.hard_pseudo_labels else 'soft'
  return (f'discriminator {block.discriminator_width}-{block.discriminator_width}-2 at weight '
          f'{block.alignment_weight}, Beta({block.mixup_alpha}, {block.mixup_alpha}) cross-set mix-up, '
          f'{labels} pseudo-labels')


# Digits: the quarter-width ConvLarge has 32 features where the full one has 128, so the
# discriminator is a quarter as wide (256). fast-SWA as Mean Teacher's digits preset: 3 cosine
# cycles of 150 steps after the 1000-step main run, averaged every 25, statistics over 23 batches.
_DIGITS = {'adanet.discriminator_width': 256, 'adanet.alignment_weight': 1.0, 'adanet.mixup_alpha': 1.0}
_DIGITS_FAST_SWA = {'num_train_steps': 1450, 'fast_swa.cycles': 3, 'fast_swa.cycle_steps': 150,
                    'fast_swa.average_every_steps': 25, 'fast_swa.lr_max': 0.05, 'fast_swa.lr_min': 0.001,
                    'fast_swa.bn_update_batches': 23}
# CIFAR-10 (ConvLarge): the paper's 1024-1024-2 discriminator at weight 1, Beta(1, 1), soft
# pseudo-labels, on the project's shared optimizer and 400k-step schedule. fast-SWA in Athiwaratkun
# et al.'s proportions (30-epoch cycles after 180 epochs, averaged every 3 epochs): 3 cycles of
# 66k steps after the 400k-step main run, averaged every 6.6k steps, statistics over one epoch of the
# 46k unlabeled images (360 batches of 128).
_CIFAR10 = {'adanet.discriminator_width': 1024, 'adanet.alignment_weight': 1.0, 'adanet.mixup_alpha': 1.0}
_CIFAR10_FAST_SWA = {'num_train_steps': 598_000, 'fast_swa.cycles': 3, 'fast_swa.cycle_steps': 66_000,
                     'fast_swa.average_every_steps': 6_600, 'fast_swa.lr_max': 0.05,
                     'fast_swa.lr_min': 0.001, 'fast_swa.bn_update_batches': 360}
# ImageNet (ResNet-18, 10% labels), the authors' resnet/adanet-resnet.py: 256 labeled + 256
# unlabeled images per step, SGD lr 0.1 divided by 10 after epochs 30, 45 and 55 of 60 (epochs of
# 1.28M / 256 = 5000 steps), weight decay 1e-4, no warm-up; the reversal coefficient over those
# 300k steps. (Their ResNet code computes the pseudo-labels in training mode; the ConvLarge
# code's evaluation mode is kept here.)
_IMAGENET = {'model': 'resnet18', 'data.label_fraction': 0.1, 'labeled_batch_size': 256,
             'unlabeled_batch_size': 256, 'lr_schedule': 'step', 'learning_rate': 0.1,
             'weight_decay': 1e-4, 'warmup_steps': 0, 'num_train_steps': 300_000,
             'lr_decay_boundaries': (150_000, 225_000, 275_000), 'lr_decay_factor': 0.1,
             'adanet.discriminator_width': 1024, 'adanet.alignment_weight': 1.0,
             'adanet.mixup_alpha': 1.0}
PRESETS = {
    'digits': {'adanet': _DIGITS, 'adanet_fast_swa': {**_DIGITS, **_DIGITS_FAST_SWA}},
    'cifar10': {'adanet': _CIFAR10, 'adanet_fast_swa': {**_CIFAR10, **_CIFAR10_FAST_SWA}},
    'imagenet': {'adanet': _IMAGENET},
}

METHOD = base.Method(
    name=NAME, train_step=train_step, uses_unlabeled=True, config_blocks=config_blocks,
    validate=validate, init_model_state=init_model_state, presets=PRESETS, describe=describe)
