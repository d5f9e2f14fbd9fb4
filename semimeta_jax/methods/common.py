"""Pieces every training method shares: forwards in either mode, and the optimizer step."""

import jax.numpy as jnp

from semimeta_jax import losses

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


def accuracy(logits, labels):
  """Top-1 accuracy of a batch, in [0, 1]."""
  return jnp.mean(losses.topk_correct(logits, labels, 1))


def apply_update(state, grads, batch_stats, config):
  """One optimizer step (and EMA update when the state keeps one)."""
  return state.apply_gradients(grads=grads, batch_stats=batch_stats, ema_decay=config.ema_decay)

