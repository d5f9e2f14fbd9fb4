"""The supervised baselines: labeled-only, and fully-supervised (the same step with every label)."""

import jax

from semimeta_jax import losses
from semimeta_jax.methods import base
from semimeta_jax.methods import common
from semimeta_jax.methods import options


def train_step(state, batch, *, config, num_classes):
  """One cross-entropy update on the labeled batch. Pure: (state, batch) -> (state, metrics).

  The unlabeled part of the batch, if any, is ignored.
  """
  del num_classes  # The labels carry it.
  labeled = batch['labeled']
  lr = options.learning_rate_schedule(config)(state.step)

  def loss_fn(params):
    logits, stats = common.train_forward(state, params, labeled['image'], state.batch_stats,
                                         state.step_key(common.DROPOUT_LABELED))
    return losses.cross_entropy(logits, labeled['label']), (stats, logits)

  (loss, (stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics = {
      'loss': loss,
      'supervised_loss': loss,
      'learning_rate': lr,
      'train_accuracy': common.accuracy(logits, labeled['label']),
  }
  return common.finish_step(state, grads, stats, metrics)


# Labeled-only, or fully supervised with data.num_labels=-1: no unlabeled stream either way.
# The papers' baselines: the same network on the labels alone, or on every label.
PRESETS = {
    'digits': {'labeled_only': {}, 'fully_supervised': {'data.num_labels': -1}},
    'cifar10': {'labeled_only': {}, 'fully_supervised': {'data.num_labels': -1}},
    # ImageNet: both run as many steps as 90 epochs of the whole train split at batch 512 (100
    # passes over configs/imagenet.py's unlabeled pool), the standard ResNet-18 schedule.
    'imagenet': {'labeled_only': {'num_epochs': 100},
                 'fully_supervised': {'num_epochs': 100, 'data.label_fraction': 0.0, 'data.num_labels': -1}},
}

METHOD = base.Method(name='supervised', train_step=train_step, uses_unlabeled=False,
                     presets=PRESETS)
