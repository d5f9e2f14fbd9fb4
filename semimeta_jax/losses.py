"""Losses of SemiMeta and its baselines, each averaged over the batch."""

import jax
import jax.numpy as jnp
import optax


def at_least_float32(x: jax.Array) -> jax.Array:
  """Upcasts half-precision logits to float32; float64 stays float64 (for tests)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def cross_entropy_per_example(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Cross-entropy of each integer label under its row of `logits` (optax's)."""
  return optax.losses.softmax_cross_entropy_with_integer_labels(at_least_float32(logits),
                                                                labels.astype(jnp.int32))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy of integer `labels` under `logits` (PyTorch's F.cross_entropy)."""
  return jnp.mean(cross_entropy_per_example(logits, labels))


def kl_divergence(targets: jax.Array, logits: jax.Array) -> jax.Array:
  """Mean over the batch of KL(targets || softmax(logits)) (PyTorch's kl_div, 'batchmean').

  Its gradient in the logits equals that of the soft-target cross-entropy; the
  entropy term only makes the reported value zero at a perfect fit.
  """
  log_probs = jax.nn.log_softmax(at_least_float32(logits))
  return jnp.mean(optax.losses.kl_divergence(log_probs, targets))


def probability_mse(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean over the batch of ||softmax(logits) - targets||^2 (SemiMeta's Phi, summed over classes)."""
  probs = jax.nn.softmax(at_least_float32(logits))
  return jnp.mean(jnp.sum(jnp.square(probs - targets), axis=-1))


def entropy(probs: jax.Array) -> jax.Array:
  """Mean Shannon entropy (nats) of the rows of `probs`."""
  return jnp.mean(-jnp.sum(jax.scipy.special.xlogy(probs, probs), axis=-1))


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """Per-example 1.0 where `labels` is among the `k` largest logits, else 0.0.

  Ties are broken against the label (a label tied with the k-th logit counts only
  if fewer than k logits are strictly larger), so constant logits are not "correct".
  """
  label_logit = jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=-1)
  num_larger = jnp.sum(logits > label_logit, axis=-1)
  num_tied_before = jnp.sum((logits == label_logit) & (jnp.arange(logits.shape[-1]) < labels[:, None]), axis=-1)
  return (num_larger + num_tied_before < k).astype(jnp.float32)
