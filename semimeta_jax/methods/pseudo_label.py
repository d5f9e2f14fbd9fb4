"""Pseudo-Label (Lee, "Pseudo-Label: The Simple and Efficient Semi-Supervised Learning Method
for Deep Neural Networks", ICML 2013 Workshop on Challenges in Representation Learning).

Each unlabeled example takes as its label the class the network predicts for it now
(the argmax, recomputed at every update), and is trained on with the cross-entropy
to that hard label, weighted by alpha(t). As the paper (its equations 15 and 16):
  * every unlabeled example counts: Lee has no confidence threshold (the argmax of
    every prediction is its pseudo-label). `pseudo_label.threshold` > 0 keeps only the
    examples whose largest probability reaches it, the later reading of the method
    (e.g. Oliver et al., 2018, 0.95); 0, the default, is the paper's;
  * alpha(t) = 0 for t < T1, alpha_f (t - T1) / (T2 - T1) for T1 <= t < T2 and alpha_f
    from T2 on, with alpha_f = 3 (the paper: T1 = 100, T2 = 600 epochs). Here alpha_f is
    `consistency_weight`, T1 `pseudo_label.rampup_start_steps` and T2
    `consistency_rampup_steps` (both counted from step 0), alpha read at the step
    being taken.
One training step:
  1. one training-mode forward of the joined labeled + unlabeled batch;
  2. y' = argmax softmax(f(x_u)) (and the threshold's mask), without gradient;
  3. loss = CE(labeled) + alpha(t) * sum(mask * CE(f(x_u), y')) / B_u.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections

from semimeta_jax import errors
from semimeta_jax import losses
from semimeta_jax.methods import base
from semimeta_jax.methods import common
from semimeta_jax.methods import options


def config_blocks():
  """The `pseudo_label` block."""
  return {'pseudo_label': ml_collections.ConfigDict({
      'threshold': 0.0,  # Smallest max-probability trained on: 0 = every example (Lee); 0.95 (Oliver et al.).
      'rampup_start_steps': 0,  # T1: alpha(t) = 0 before it, then linear up to consistency_rampup_steps (T2).
  })}


def validate(config) -> None:
  """`pseudo_label.threshold` in [0, 1]; 0 <= T1 <= T2 (`consistency_rampup_steps`).

  Raises:
    errors.ConfigError: naming the field.
  """
  block = config.pseudo_label
  errors.require(0.0 <= block.threshold <= 1.0, 'pseudo_label.threshold', block.threshold, 'must be in [0, 1]')
  start, end = block.rampup_start_steps, config.consistency_rampup_steps
  errors.require(isinstance(start, int) and 0 <= start <= max(end, 0), 'pseudo_label.rampup_start_steps',
                 start, f'must be an integer in [0, consistency_rampup_steps={end}] (T1 <= T2)')


def alpha_schedule(config):
  """Lee's alpha(t): 0 before T1, linear from T1 to T2, `consistency_weight` (alpha_f) from T2 on.

  T1 = `pseudo_label.rampup_start_steps`, T2 = `consistency_rampup_steps`; T1 = T2 is a step.
  """
  alpha_f = config.consistency_weight
  start, end = config.pseudo_label.rampup_start_steps, config.consistency_rampup_steps

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    if end > start:
      return alpha_f * jnp.clip((count - start) / (end - start), 0.0, 1.0)
    return jnp.where(count >= start, alpha_f, 0.0).astype(jnp.float32)

  return schedule


def pseudo_label_loss(logits, threshold):
  """(mean over the batch of mask * CE(logits, argmax), fraction of confident examples).

  The hard labels and the mask carry no gradient; an unconfident example counts in
  the batch size but adds nothing.
  """
  logits = losses.at_least_float32(logits)
  probs = jax.lax.stop_gradient(jax.nn.softmax(logits))
  labels = jnp.argmax(probs, axis=-1)
  mask = (jnp.max(probs, axis=-1) >= threshold).astype(jnp.float32)
  per_example = losses.cross_entropy_per_example(logits, labels)
  return jnp.mean(mask * per_example), jnp.mean(mask)


def objective(params, state, batch, *, weight, config):
  """CE on the labeled rows + alpha(t) * the pseudo-label loss on the unlabeled ones."""
  labeled = batch['labeled']
  num_labeled = labeled['image'].shape[0]
  images = jnp.concatenate([labeled['image'], batch['unlabeled']['image']])
  logits, stats = common.train_forward(state, params, images, state.batch_stats,
                                       state.step_key(common.DROPOUT_UNLABELED))
  supervised = losses.cross_entropy(logits[:num_labeled], labeled['label'])
  unsupervised, confident = pseudo_label_loss(logits[num_labeled:], config.pseudo_label.threshold)
  return supervised + weight * unsupervised, (stats, supervised, unsupervised, confident, logits)


def train_step(state, batch, *, config, num_classes):
  """One Pseudo-Label update. Pure: (state, batch) -> (state, metrics)."""
  del num_classes  # The labels carry it.
  labeled, unlabeled = batch['labeled'], batch['unlabeled']
  num_labeled = labeled['image'].shape[0]
  lr = options.learning_rate_schedule(config)(state.step)
  weight = alpha_schedule(config)(state.step)
  loss_fn = functools.partial(objective, state=state, batch=batch, weight=weight, config=config)
  (loss, (stats, supervised, unsupervised, confident, logits)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  metrics = {
      'loss': loss,
      'supervised_loss': supervised,
      'consistency_loss': unsupervised,
      'confident_fraction': confident,
      'learning_rate': lr,
      'consistency_weight': weight,
      'train_accuracy': common.accuracy(logits[:num_labeled], labeled['label']),
  }
  return common.finish_step(state, grads, stats, metrics,
                            scored=[('unlabeled_accuracy', logits[num_labeled:], unlabeled)])


# Lee: alpha_f = 3, T1 = 100 and T2 = 600 epochs, no threshold. Digits: T1 = 100 and T2 = 600
# of the run's 1000 steps (alpha_f for its last 40%); CIFAR-10: the same shares of
# configs/cifar10.py's 400k steps.
PRESETS = {
    'digits': {'pseudo_label': {'consistency_weight': 3.0, 'pseudo_label.threshold': 0.0,
                                'pseudo_label.rampup_start_steps': 100, 'consistency_rampup_steps': 600}},
    'cifar10': {'pseudo_label': {'consistency_weight': 3.0, 'pseudo_label.threshold': 0.0,
                                 'pseudo_label.rampup_start_steps': 40_000,
                                 'consistency_rampup_steps': 240_000}},
}

METHOD = base.Method(name='pseudo_label', train_step=train_step, uses_unlabeled=True,
                     config_blocks=config_blocks, validate=validate, presets=PRESETS)
