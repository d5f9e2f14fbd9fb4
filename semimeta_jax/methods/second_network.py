"""A second network of the classifier's architecture, kept in `TrainState.extra` with its own optimizer.

Deep Co-Training and Dual Student train two networks side by side. The first is
the run's classifier (`state.params`, `state.batch_stats`, `state.opt_state`); the
second lives under `extra[KEY]` as {'params', 'batch_stats', 'opt_state'}, so it is
replicated on the mesh, checkpointed and verified with the rest of the state, and
evaluated as its own weight set (`weight_set`). It follows the same optimizer and
learning-rate schedule (`state.tx`): the reference codes step both networks with
one SGD of the same settings.
"""

import jax
import jax.numpy as jnp
import optax

from semimeta_jax.methods import base
from semimeta_jax.methods import options

KEY = 'second_network'


def init(config, *, model, image_shape, rng, params, batch_stats, num_classes):
  """`Method.init_model_state`: the second network, drawn from a key of its own.

  Returns:
    {KEY: {'params', 'batch_stats', 'opt_state'}}: the classifier's architecture,
    another random initialisation, a fresh optimizer state.
  """
  del params, batch_stats, num_classes  # The second network shares nothing with the first.
  params_key, dropout_key = jax.random.split(rng)
  variables = model.init({'params': params_key, 'dropout': dropout_key},
                         jnp.zeros((1, *image_shape), jnp.float32), train=False)
  second_params = variables['params']
  return {KEY: {'params': second_params, 'batch_stats': variables.get('batch_stats', {}),
                'opt_state': options.optimizer(config).init(second_params)}}


def weights(state):
  """(params, batch statistics) of the second network."""
  second = state.extra[KEY]
  return second['params'], second['batch_stats']


def apply_gradients(state, grads, batch_stats):
  """`state` with one optimizer step taken on the second network (its own optimizer state).

  Call it on the state the step started from, before the first network's update
  replaces it: `state.tx` is the same transformation for both.
  """
  second = state.extra[KEY]
  updates, opt_state = state.tx.update(grads, second['opt_state'], second['params'])
  new_second = {'params': optax.apply_updates(second['params'], updates),
                'batch_stats': batch_stats, 'opt_state': opt_state}
  return dict(state.extra, **{KEY: new_second})


def weight_set() -> base.WeightSet:
  """The second network as a weight set of the evaluation ('eval_second')."""
  return base.WeightSet(prefix='eval_second', select=weights)
