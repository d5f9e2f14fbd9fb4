"""The exponential moving average of the weights, an option of every method.

`config.ema.decay > 0` keeps avg <- d avg + (1 - d) theta (and the same of the
batch statistics) after every optimizer step, in `TrainState.extra['ema']`; Mean
Teacher's teacher is this average (its decay warms up, `Method.ema_decay`). The
average is evaluated beside the raw weights (eval_ema/...), and is the run's
reported weight set with `config.ema.headline`.
"""

import jax
import jax.numpy as jnp
import ml_collections

from semimeta_jax import errors
from semimeta_jax.methods import base

NAME = 'ema'
PREFIX = 'eval_ema'


def config_blocks():
  """The `ema` block: off by default."""
  return {NAME: ml_collections.ConfigDict({
      'decay': 0.0,  # 0 = no average (mean_teacher requires > 0).
      'headline': False,  # The run's reported error is the average's (else the raw weights').
  })}


def validate(config) -> None:
  """`ema.decay` in [0, 1); `ema.headline` needs an average."""
  errors.require(0 <= config.ema.decay < 1, 'ema.decay', config.ema.decay, 'must be in [0, 1)')
  if config.ema.headline:
    errors.require(config.ema.decay > 0, 'ema.headline', True, 'needs config.ema.decay > 0')


def weights(state):
  """(params, batch_stats) of the average."""
  return state.extra[NAME]['params'], state.extra[NAME]['batch_stats']


def init_state(config, params, batch_stats):
  """The average starts at the initial weights."""
  del config
  copy = lambda tree: jax.tree.map(jnp.array, tree)
  return {'params': copy(params), 'batch_stats': copy(batch_stats)}


def update(average, params, batch_stats, decay):
  """avg <- decay avg + (1 - decay) new, for the weights and the batch statistics."""
  mix = lambda old, new: decay * old + (1.0 - decay) * new
  return {'params': jax.tree.map(mix, average['params'], params),
          'batch_stats': jax.tree.map(mix, average['batch_stats'], batch_stats)}


def wrap(step, config, method):
  """`step` followed by the average's update. Pure: (state, batch) -> (state, metrics)."""

  def ema_step(state, batch):
    decay = method.ema_decay(config, state.step)
    new_state, metrics = step(state, batch)
    average = update(new_state.extra[NAME], new_state.params, new_state.batch_stats, decay)
    return new_state.replace(extra=dict(new_state.extra, **{NAME: average})), metrics

  return ema_step


OPTION = base.Option(
    name=NAME,
    config_blocks=config_blocks,
    renamed_fields={'ema_decay': 'ema.decay', 'eval_with_ema': 'ema.headline'},
    validate=validate,
    enabled=lambda config, method: method.keeps_ema(config),
    init_state=init_state,
    wrap=wrap,
    weight_sets=lambda config: [base.WeightSet(prefix=PREFIX, select=weights)],
    headline=lambda config: config.ema.headline,
    describe=lambda config: f'EMA of the weights (decay {config.ema.decay})')
