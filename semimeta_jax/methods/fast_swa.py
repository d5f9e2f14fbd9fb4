"""fast-SWA (Athiwaratkun et al., "There are many consistent explanations of unlabeled data:
why you should average", ICLR 2019), an option of every method.

After the main schedule, the last `cycles * cycle_steps` of `config.num_train_steps`
follow a cyclic cosine learning rate (`learning_rate_tail`): each
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
import ml_collections

from semimeta_jax import errors
from semimeta_jax.methods import base
from semimeta_jax.methods import common
from semimeta_jax.models import layers

NAME = 'fast_swa'
PREFIX = 'eval_swa'


def config_blocks():
  """The `fast_swa` block: off by default (`cycles = 0`)."""
  return {NAME: ml_collections.ConfigDict({
      'cycles': 0,  # 0 = off.
      'cycle_steps': 0,
      'average_every_steps': 0,
      'lr_max': 0.0,
      'lr_min': 0.0,
      'bn_update_batches': 0,
      'headline': True,  # The run's reported error is the averaged weights' (else the raw).
  })}


def enabled(config) -> bool:
  """Whether the run has a fast-SWA tail."""
  return config.fast_swa.cycles > 0


def tail_steps(config) -> int:
  """Steps of fast-SWA's cyclic tail: the last ones of `num_train_steps` (0 when off)."""
  swa = config.fast_swa
  return swa.cycles * swa.cycle_steps if swa.cycles > 0 else 0


def cyclic_cosine(start: int, cycle_steps: int, lr_max: float, lr_min: float):
  """fast-SWA's tail from step `start` on: every cycle a cosine from lr_max down to lr_min."""

  def schedule(count):
    phase = jnp.mod(jnp.asarray(count) - start, cycle_steps).astype(jnp.float32) / cycle_steps
    return lr_min + 0.5 * (lr_max - lr_min) * (1.0 + jnp.cos(jnp.pi * phase))

  return schedule


def learning_rate_tail(config):
  """(steps, schedule) of the cyclic tail that replaces the main schedule's last steps, or None."""
  steps = tail_steps(config)
  if not steps:
    return None
  swa = config.fast_swa
  return steps, cyclic_cosine(config.num_train_steps - steps, swa.cycle_steps, swa.lr_max, swa.lr_min)


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


def wrap(step, config, method=None):
  """`step` followed by the fast-SWA average update. Pure: (state, batch) -> (state, metrics)."""
  del method  # The average is the same for every method.

  def swa_step(state, batch):
    state, metrics = step(state, batch)
    include = average_now(config, state.step)
    swa = update_average(state.extra[NAME], state.params, include)
    return state.replace(extra=dict(state.extra, **{NAME: swa})), dict(metrics, swa_count=swa['count'])

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
  swa = state.extra[NAME]
  zeros = jax.tree.map(jnp.zeros_like, swa['batch_stats'])
  _, after = common.train_forward(state, swa['params'], _joined_images(batch), zeros,
                                  jax.random.key(0))
  return jax.tree.map(lambda s: s / (1.0 - layers.BN_MOMENTUM), after)


def with_recomputed_batch_stats(state, per_batch_stats):
  """The state with the average's batch statistics the mean of the per-batch statistics.

  Args:
    state: a TrainState with fast-SWA on.
    per_batch_stats: a non-empty list of `batch_statistics` results, one per batch.

  Returns:
    The state whose averaged weights carry the statistics of a full pass over
    those batches (PyTorch's `bn_update`: the plain mean of the batch statistics).
  """
  mean = jax.tree.map(lambda *s: sum(s) / len(s), *per_batch_stats)
  swa = dict(state.extra[NAME], batch_stats=mean)
  return state.replace(extra=dict(state.extra, **{NAME: swa}))


def init_state(config, params, batch_stats):
  """An empty average (count 0) of the weights' shapes."""
  del config
  copy = lambda tree: jax.tree.map(jnp.array, tree)
  return {'params': copy(params), 'batch_stats': copy(batch_stats), 'count': jnp.zeros((), jnp.int32)}


def weights(state):
  """(params, batch_stats) of the average."""
  return state.extra[NAME]['params'], state.extra[NAME]['batch_stats']


def has_snapshot(state) -> bool:
  """Whether the average holds a snapshot yet (host-side; reads the count)."""
  return int(jax.device_get(state.extra[NAME]['count'])) > 0


def weight_sets(config):
  """The averaged weights, their batch statistics recomputed before each evaluation."""
  return [base.WeightSet(prefix=PREFIX, select=weights, ready=has_snapshot,
                         statistics_batches=config.fast_swa.bn_update_batches,
                         batch_statistics=batch_statistics,
                         with_statistics=with_recomputed_batch_stats)]


def describe(config) -> str:
  """fast-SWA's settings in the run plan."""
  swa = config.fast_swa
  return (f'fast-SWA: {swa.cycles} cycles of {swa.cycle_steps} steps (lr {swa.lr_max} -> {swa.lr_min}), '
          f'averaged every {swa.average_every_steps}')


OPTION = base.Option(
    name=NAME,
    config_blocks=config_blocks,
    validate=validate,
    enabled=lambda config, method: enabled(config),
    init_state=init_state,
    wrap=wrap,
    weight_sets=weight_sets,
    headline=lambda config: config.fast_swa.headline,
    learning_rate_tail=learning_rate_tail,
    describe=describe)
