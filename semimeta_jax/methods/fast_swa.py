"""fast-SWA (Athiwaratkun et al., "There are many consistent explanations of unlabeled data:
why you should average", ICLR 2019), an option of every method.

After the main schedule, the last `cycles * cycle_steps` of `config.num_train_steps`
follow a cyclic cosine learning rate (`schedules.learning_rate_schedule`): each
cycle falls from `fast_swa.lr_max` to `fast_swa.lr_min`. Inside the cycles the
weights are averaged every `average_every_steps` updates (fast-SWA averages many
points of each cycle where plain SWA takes one per cycle), the running mean kept
in `TrainState.swa` so that it is checkpointed. The averaged weights never trained
with batch norm, so before they are evaluated their statistics are recomputed by
a pass over training batches in training mode (`recompute_batch_stats`), as
PyTorch's `bn_update`: the running averages become the plain mean over the batches
of each batch's statistics.
"""

import jax
import jax.numpy as jnp

from semimeta_jax import errors
from semimeta_jax import schedules
from semimeta_jax.methods import common
from semimeta_jax.models import layers


def enabled(config) -> bool:
  """Whether the run has a fast-SWA tail."""
  return config.fast_swa.cycles > 0


tail_steps = schedules.fast_swa_tail_steps


def validate(config) -> None:
  """The `fast_swa` block (nothing is required when `cycles` is 0).

  Raises:
    errors.ConfigError: naming the field.
  """
  swa, require = config.fast_swa, errors.require
  require(isinstance(swa.cycles, int) and swa.cycles >= 0, 'fast_swa.cycles', swa.cycles,
          'must be an integer >= 0 (0 = off)')
  if not enabled(config):
    return
  require(isinstance(swa.cycle_steps, int) and swa.cycle_steps > 0, 'fast_swa.cycle_steps',
          swa.cycle_steps, 'must be a positive integer')
  require(isinstance(swa.average_every_steps, int) and swa.average_every_steps > 0
          and swa.cycle_steps % swa.average_every_steps == 0, 'fast_swa.average_every_steps',
          swa.average_every_steps,
          f'must be a positive divisor of fast_swa.cycle_steps={swa.cycle_steps}, so that the end of '
          f'every cycle is averaged')
  require(tail_steps(config) < config.num_train_steps, 'fast_swa.cycles', swa.cycles,
          f'the tail ({tail_steps(config)} steps) must leave a main schedule inside '
          f'num_train_steps={config.num_train_steps}')
  require(swa.lr_max > 0 and 0 <= swa.lr_min <= swa.lr_max, 'fast_swa.lr_min', swa.lr_min,
          f'need 0 <= lr_min <= lr_max and lr_max > 0 (lr_max={swa.lr_max})')
  require(isinstance(swa.bn_update_batches, int) and swa.bn_update_batches > 0,
          'fast_swa.bn_update_batches', swa.bn_update_batches, 'must be a positive integer')


def average_now(config, updates_taken: jax.Array) -> jax.Array:
  """Whether the weights after `updates_taken` updates join the average (traced bool)."""
  into_tail = updates_taken - (config.num_train_steps - tail_steps(config))
  return (into_tail > 0) & (into_tail % config.fast_swa.average_every_steps == 0)


def update_average(swa, params, include: jax.Array):
  """The running mean of the snapshots, with `params` added where `include` is True."""
  count = swa['count'] + include.astype(jnp.int32)
  # Incremental mean: a + (p - a) / n is the mean of n snapshots without keeping a sum.
  weight = include.astype(jnp.float32) / jnp.maximum(count, 1).astype(jnp.float32)
  average = jax.tree.map(lambda a, p: a + (p - a) * weight.astype(a.dtype), swa['params'], params)
  return dict(swa, params=average, count=count)


def wrap(step, config):
  """`step` followed by the fast-SWA average update. Pure: (state, batch) -> (state, metrics)."""

  def swa_step(state, batch):
    state, metrics = step(state, batch)
    include = average_now(config, state.step)
    swa = update_average(state.swa, state.params, include)
    return state.replace(swa=swa), dict(metrics, swa_count=swa['count'])

  return swa_step


def _joined_images(batch):
  """Every stream's images of a training batch, joined: the data the statistics are for."""
  return jnp.concatenate([part['image'] for part in batch.values()])


def batch_statistics(state, batch):
  """This batch's own batch-norm statistics, layer by layer, under the averaged weights.

  A training-mode forward from zeroed running averages leaves (1 - momentum) times
  the batch statistic in them (Flax: new = momentum * old + (1 - momentum) * batch).
  Dropout acts as in training (PyTorch's `bn_update` runs `model.train()`), with a
  fixed key so that the pass is deterministic. Pure; the loop jits it over the mesh.
  """
  zeros = jax.tree.map(jnp.zeros_like, state.swa['batch_stats'])
  _, after = common.train_forward(state, state.swa['params'], _joined_images(batch), zeros,
                                  jax.random.key(0))
  return jax.tree.map(lambda s: s / (1.0 - layers.BN_MOMENTUM), after)


def with_recomputed_batch_stats(state, per_batch_stats):
  """The state with `swa['batch_stats']` the mean of the per-batch statistics.

  Args:
    state: a TrainState with fast-SWA on.
    per_batch_stats: a non-empty list of `batch_statistics` results, one per batch.

  Returns:
    The state whose averaged weights carry the statistics of a full pass over
    those batches (PyTorch's `bn_update`: the plain mean of the batch statistics).
  """
  mean = jax.tree.map(lambda *s: sum(s) / len(s), *per_batch_stats)
  return state.replace(swa=dict(state.swa, batch_stats=mean))
