"""FlexMatch (Zhang et al., "FlexMatch: Boosting Semi-Supervised Learning with Curriculum Pseudo
Labeling", NeurIPS 2021), as USB's `algorithms/flexmatch` defines it.

A memory `selected_label` holds, for every example of the unlabeled pool, the class it
was last confidently predicted as (-1 until then). From it each class's learning
effect sigma_c = (entries of class c) / max(counts), where with `thresh_warmup` (USB's
default) the max runs over the class counts AND the unused count (pool_size - entries
set), without it over the class counts only. The mask of a row predicted as class c:
  max p >= p_cutoff * sigma_c / (2 - sigma_c)   (the convex mapping, USB's default).
Order within a step, as USB's FlexMatchThresholdingHook.masking: the mask uses sigma as
it stood before this batch; then the rows with max p >= p_cutoff write their argmax
into the memory; then sigma is recomputed from it, except when one count (a class's
or the unused one) equals the pool size (USB's `max(counter) < ulb_dest_len` guard):
then sigma keeps its value. So the first step (every entry -1, sigma 0) masks
nothing out: its threshold is 0.
Several rows of one batch with the same index: the last selected row (in batch order)
writes, as an indexed assignment that applies its writes in order.
The memory is `num_train` long, indexed by the train-split index (entries outside the
pool stay -1 and are not counted as unused: the unused count is pool_size - entries
set). Targets are the argmax (`hard_label`) or the weak probabilities unchanged
(soft: USB passes probabilities with `softmax=False`; T is not applied).
"""

import jax.numpy as jnp
import ml_collections

from semimeta_jax import errors
from semimeta_jax.methods import base
from semimeta_jax.methods import confidence

NAME = 'flexmatch'


def config_blocks():
  """The `flexmatch` block: USB's classic-CV settings."""
  return {NAME: ml_collections.ConfigDict({
      'p_cutoff': 0.95,  # tau: the ceiling of every class's threshold, and the memory's bar.
      'lambda_u': 1.0,  # Weight of the consistency loss (USB's ulb_loss_ratio).
      'thresh_warmup': True,  # sigma divided by the max including the unused count.
      'hard_label': True,  # Argmax targets; False: the weak probabilities themselves.
      'T': 0.5,  # USB's field; never applied (soft targets are the probabilities).
  })}


def validate(config) -> None:
  """`flexmatch.p_cutoff` in [0, 1], `flexmatch.lambda_u` >= 0, `flexmatch.T` > 0."""
  confidence.validate_common(config, NAME)
  confidence.validate_fraction(config, f'{NAME}.p_cutoff')
  errors.require(config[NAME].T > 0, f'{NAME}.T', config[NAME].T, 'must be > 0')


def init_extra_state(config, *, num_train: int, num_classes: int):
  """Every memory entry -1 (unused), every learning effect 0."""
  del config
  return {NAME: {'selected_label': jnp.full((num_train,), -1, jnp.int32),
                 'classwise_acc': jnp.zeros((num_classes,), jnp.float32)}}


def learning_effect(selected_label, previous, *, pool_size: int, thresh_warmup: bool):
  """USB's FlexMatchThresholdingHook.update: sigma_c from the memory, or `previous` when guarded.

  Args:
    selected_label: int [num_train], -1 or the class of each entry.
    previous: float [C], sigma before this update (kept when a count equals the pool size).
    pool_size: entries of the unlabeled pool (USB's ulb_dest_len).
    thresh_warmup: divide by the max over the class counts and the unused count.
  """
  num_classes = previous.shape[0]
  unset_to_dropped = jnp.where(selected_label >= 0, selected_label, num_classes)
  counts = jnp.zeros((num_classes,), jnp.int32).at[unset_to_dropped].add(1, mode='drop')
  unused = pool_size - jnp.sum(counts)
  largest_class = jnp.max(counts)
  largest = jnp.maximum(largest_class, unused)
  denominator = largest if thresh_warmup else largest_class
  sigma = counts.astype(jnp.float32) / jnp.maximum(denominator, 1).astype(jnp.float32)
  return jnp.where(largest < pool_size, sigma, previous)


def remember(selected_label, indices, predicted, selected):
  """`selected_label[indices[selected]] = predicted[selected]`; of equal indices the last row wins."""
  later = jnp.triu(indices[:, None] == indices[None, :], k=1) & selected[None, :]
  writes = selected & ~jnp.any(later, axis=1)
  target = jnp.where(writes, indices, selected_label.shape[0])  # Out of range: dropped.
  return selected_label.at[target].set(predicted.astype(jnp.int32), mode='drop')


def make_targets(config, weak_logits, labeled_logits, unlabeled, state, pool_size):
  """The flexible-threshold mask (sigma before this batch), then the memory and sigma updated."""
  del labeled_logits
  block = config[NAME]
  probs = confidence.probabilities(weak_logits)
  max_probs, predicted = jnp.max(probs, axis=-1), jnp.argmax(probs, axis=-1)
  sigma = state['classwise_acc'][predicted]
  mask = (max_probs >= block.p_cutoff * (sigma / (2.0 - sigma))).astype(probs.dtype)
  memory = remember(state['selected_label'], unlabeled['index'].astype(jnp.int32), predicted,
                    max_probs >= block.p_cutoff)
  classwise_acc = learning_effect(memory, state['classwise_acc'], pool_size=pool_size,
                                  thresh_warmup=block.thresh_warmup)
  targets = confidence.pseudo_labels(probs, hard=block.hard_label, from_logits=False)
  metrics = {'memory_fraction': jnp.sum(memory >= 0) / pool_size,
             'mean_class_threshold': jnp.mean(block.p_cutoff * classwise_acc / (2.0 - classwise_acc))}
  return confidence.Targets(targets, mask, {'selected_label': memory, 'classwise_acc': classwise_acc},
                            metrics)


def train_step(state, batch, *, config, num_classes, pool_size):
  """One FlexMatch update (`confidence.train_step`); `pool_size` is the unlabeled pool's size."""
  errors.require(pool_size > 0, 'unlabeled pool size', pool_size, 'FlexMatch needs unlabeled examples')
  return confidence.train_step(state, batch, config=config, num_classes=num_classes, name=NAME,
                               make_targets=make_targets, pool_size=pool_size)


# USB's classic-CV configs (every dataset and label count): p_cutoff 0.95, warm-up, hard labels.
PRESETS = confidence.usb_presets(
    NAME, {f'{NAME}.p_cutoff': 0.95, f'{NAME}.lambda_u': 1.0, f'{NAME}.thresh_warmup': True,
           f'{NAME}.hard_label': True})

METHOD = base.Method(
    name=NAME, train_step=train_step, uses_unlabeled=True, strong_view=confidence.strong_view,
    reads_pool_size=True, config_blocks=config_blocks, validate=validate,
    init_extra_state=init_extra_state, presets=PRESETS,
    describe=lambda config: (f'p_cutoff {config[NAME].p_cutoff}, lambda_u {config[NAME].lambda_u}, '
                             f'threshold warm-up {config[NAME].thresh_warmup}'))
