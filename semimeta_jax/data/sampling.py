"""The training index streams of in-memory datasets, computed on the device.

A stream (labeled or unlabeled) draws from a pool of train-split indices. Its
infinite order is epoch after epoch of the pool, epoch `e` permuted by
`jax.random.permutation(fold_in(order_key, e), n)`; the GLOBAL batch at step s
is positions [s * B, (s + 1) * B) of that order. A batch may span an epoch
boundary, or several when the pool is smaller than a batch.

So the batch at step s is a pure function of (seed, s): it does not depend on
the number of devices or processes, and a run resumed at step k computes batch
k directly. JAX keeps its random streams (threefry, `jax_threefry_partitionable`)
fixed across releases and shardings.
"""

import jax
import jax.numpy as jnp


def epochs_touched(pool_size: int, batch_size: int) -> int:
  """Most epochs one batch of `batch_size` positions can touch (a static bound)."""
  return (batch_size - 1) // pool_size + 2


def batch_positions(step, batch_size: int):
  """int32 [B] positions of the global batch at `step` in a stream's order.

  Positions are int32: a run must keep num_train_steps * batch_size < 2**31.
  """
  return jnp.asarray(step, jnp.int32) * batch_size + jnp.arange(batch_size, dtype=jnp.int32)


def epoch_order(order_key, pool, epoch):
  """Train-split indices of the pool in the order of `epoch`: `pool[permutation(fold_in(key, e))]`."""
  return pool[jax.random.permutation(jax.random.fold_in(order_key, epoch), pool.shape[0])]


def batch_indices_from_orders(orders, step, batch_size: int):
  """Train-split indices of the global batch at `step` of one stream, from its epoch orders.

  The orders are computed beforehand and kept while read (`device_input.EpochOrders`),
  rather than permuting the pool at every step (on a GPU that was most of the
  cost of making a batch: a sort of the pool). A batch may span an epoch
  boundary, or several epochs when the pool is smaller than a batch: only the
  epochs it touches are passed.

  Args:
    orders: int32 [epochs_touched(n, B), n]: `epoch_order` of epochs first,
      first + 1, ..., where first = step * B // n.
    step: int scalar, the batch's step.
    batch_size: the global batch size B.

  Returns:
    int32 [B] train-split indices.
  """
  n = orders.shape[1]
  positions = batch_positions(step, batch_size)
  epochs = positions // n
  return orders[epochs - epochs[0], positions % n]
