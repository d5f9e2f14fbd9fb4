"""Float64 NumPy references of the losses the methods build, for tests that check their values."""

import numpy as np


def log_softmax(logits):
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def softmax(logits):
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


def train_mode_logits(state, params, images, dropout_key=None):
  """The network's training-mode logits (batch statistics of `images`), as float64 numpy."""
  import jax  # pylint: disable=g-import-not-at-top
  variables = {'params': params, 'batch_stats': state.batch_stats} if state.batch_stats else {'params': params}
  rngs = {'dropout': dropout_key if dropout_key is not None else jax.random.key(0)}
  out = state.apply_fn(variables, images, train=True, rngs=rngs,
                       mutable=['batch_stats'] if state.batch_stats else False)
  logits = out[0] if state.batch_stats else out
  return np.asarray(logits, np.float64)
