"""Pieces every training method shares: forwards in either mode, and the end of a step."""

import jax.numpy as jnp
import optax

from semimeta_jax import losses
from semimeta_jax.models import layers

# Tags folded into a step's key, one per independent random draw.
DROPOUT_META, DROPOUT_LABELED, DROPOUT_UNLABELED, DROPOUT_TEACHER, MIXUP, NOISE = range(6)


def variables(params, batch_stats):
  """The Flax variable dict of a model with (possibly empty) batch statistics."""
  return {'params': params, 'batch_stats': batch_stats} if batch_stats else {'params': params}


def eval_forward(state, params, x, *, batch_stats=None):
  """Logits in evaluation mode: running batch-norm averages, no dropout."""
  stats = state.batch_stats if batch_stats is None else batch_stats
  return state.apply_fn(variables(params, stats), x, train=False)


def train_forward(state, params, x, batch_stats, dropout_key):
  """Logits in training mode and the batch statistics after this forward.

  Batch-norm layers normalise with the statistics of `x` (over the whole global
  batch: the step runs under `jit` on the full sharded array) and update the
  running averages, as PyTorch's `model.train()` forward does.
  """
  if not batch_stats:
    return state.apply_fn(variables(params, batch_stats), x, train=True,
                          rngs={'dropout': dropout_key}), batch_stats
  logits, updates = state.apply_fn(variables(params, batch_stats), x, train=True,
                                   rngs={'dropout': dropout_key}, mutable=['batch_stats'])
  return logits, updates['batch_stats']


def eval_forward_with_features(state, params, x, *, batch_stats=None):
  """(logits, pooled features) in evaluation mode, from one forward."""
  stats = state.batch_stats if batch_stats is None else batch_stats
  logits, sown = state.apply_fn(variables(params, stats), x, train=False,
                                mutable=['intermediates'])
  return logits, layers.pooled_features(sown['intermediates'])


def train_forward_with_features(state, params, x, batch_stats, dropout_key):
  """(logits, pooled features, batch statistics) of one training-mode forward.

  As `train_forward`, with the globally pooled features before the classifier
  (what SNTG's graph, adversarial dropout and feature discriminators act on).
  """
  outputs, updates = state.apply_fn(variables(params, batch_stats), x, train=True,
                                    rngs={'dropout': dropout_key},
                                    mutable=['batch_stats', 'intermediates'])
  features = layers.pooled_features(updates['intermediates'])
  return outputs, features, updates.get('batch_stats', batch_stats)


def accuracy(logits, labels):
  """Top-1 accuracy of a batch, in [0, 1]."""
  return jnp.mean(losses.topk_correct(logits, labels, 1))


def finish_step(state, grads, batch_stats, metrics, scored=()):
  """The end every step shares: the optimizer update and the metrics dict.

  Args:
    state: the TrainState the step started from.
    grads: gradients with the structure of `state.params`.
    batch_stats: the batch statistics after the step's forwards.
    metrics: the method's own scalars (loss terms, learning rate, weights, ...).
    scored: (metric name, logits, batch part) triples: the accuracy of `logits`
      on the part's labels is added when the part has labels (a truly unlabeled
      pool has none to score).

  Returns:
    (the updated state, the metrics with 'grad_norm' and the scored accuracies).
  """
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
  for name, logits, part in scored:
    if 'label' in part:
      metrics[name] = accuracy(logits, part['label'])
  return new_state, metrics
