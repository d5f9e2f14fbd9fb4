"""Float64 NumPy references of the losses the methods build, for tests that check their values."""

import jax
import numpy as np


def log_softmax(logits):
  """log softmax over the last axis, in float64."""
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def softmax(logits):
  """softmax over the last axis, in float64."""
  return np.exp(log_softmax(logits))


def cross_entropy(logits, labels):
  """Mean over examples of -log p(label)."""
  return -np.mean(log_softmax(logits)[np.arange(len(labels)), np.asarray(labels)])


def kl(p, q):
  """Mean over examples of KL(p || q) = sum_c p (log p - log q), both given as probabilities."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  return np.mean(np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(q)), 0.0), -1))


def entropy(p):
  """Mean over examples of -sum_c p log p, in nats."""
  p = np.asarray(p, np.float64)
  return np.mean(-np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), -1))


def train_mode_logits(state, params, images):
  """The network's training-mode logits (batch statistics of `images`), as float64 numpy.

  The forward is the model's own `apply_fn`; callers turn dropout off, so the key is moot.
  """
  variables = {'params': params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  rngs = {'dropout': jax.random.key(0)}
  out = state.apply_fn(variables, images, train=True, rngs=rngs,
                       mutable=['batch_stats'] if state.batch_stats else False)
  logits = out[0] if state.batch_stats else out
  return np.asarray(logits, np.float64)
