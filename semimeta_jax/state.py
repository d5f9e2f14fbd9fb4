"""The training state: one pytree that a step consumes and returns, and that orbax saves."""

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from semimeta_jax import schedules

PyTree = Any


class TrainState(flax.struct.PyTreeNode):
  """Everything that changes during training.

  Attributes:
    step: number of optimizer updates taken so far (int32 scalar).
    params: model parameters.
    batch_stats: batch-norm running averages (empty dict for models without BN).
    opt_state: optax optimizer state.
    extra: what the method and its options keep beside the weights (e.g. Temporal
      Ensembling's per-example ensemble; an option's copy of the weights under its
      name), `{}` when they keep nothing. The training loop never reads it.
    rng: raw uint32 key data of the run's base key; per-step keys are
      `fold_in(key, step)`, so a resumed run draws the same randomness.
    apply_fn: `model.apply` (static, not saved).
    tx: the optax transformation (static, not saved).
  """

  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: optax.OptState
  extra: PyTree
  rng: jax.Array
  apply_fn: Callable[..., Any] = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, *, apply_fn, params, batch_stats, tx, rng, extra=None):
    """Builds a fresh state at step 0.

    Args:
      apply_fn: the model's `apply`.
      params: initial parameters.
      batch_stats: initial batch statistics (`{}` if the model has none).
      tx: the optimizer.
      rng: a typed or raw PRNG key, the base of every per-step key.
      extra: what the method and its options keep (default `{}`).
    """
    if jnp.issubdtype(jnp.asarray(rng).dtype, jax.dtypes.prng_key):
      rng = jax.random.key_data(rng)
    return cls(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        extra={} if extra is None else extra,
        rng=rng,
        apply_fn=apply_fn,
        tx=tx)

  def step_key(self, *tags: int) -> jax.Array:
    """Returns the key for this step (and optional sub-tags): fold_in(base, step, *tags)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)
    for tag in tags:
      key = jax.random.fold_in(key, tag)
    return key

  def apply_gradients(self, *, grads, batch_stats):
    """Takes one optimizer step.

    Args:
      grads: gradients with the structure of `params`.
      batch_stats: the batch statistics after this step's forward passes.

    Returns:
      The state after the update, with `step` incremented.
    """
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(
        step=self.step + 1,
        params=optax.apply_updates(self.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state)


def init_train_state(config, model, image_shape, rng: jax.Array, *, tx=None,
                     extra=None) -> TrainState:
  """Initialises a model's variables and optimizer at step 0.

  Args:
    config: the run configuration (optimizer fields are read when `tx` is None).
    model: a Flax module called as `model.apply(variables, x, train=...)`.
    image_shape: (H, W, C) of one input.
    rng: the run's base key (typed).
    tx: the optimizer; default: SGD with coupled weight decay on `config`'s main
      schedule (`methods.init_train_state` passes the run's, options included).
    extra: what the method and its options keep: a pytree, or
      `(params, batch_stats) -> pytree` for state built from the initial weights.
  """
  init_key, dropout_key, base_key = jax.random.split(rng, 3)
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  variables = model.init({'params': init_key, 'dropout': dropout_key}, dummy, train=False)
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  return TrainState.create(
      apply_fn=model.apply,
      params=params,
      batch_stats=batch_stats,
      tx=tx if tx is not None else schedules.sgd_with_coupled_weight_decay(config),
      rng=base_key,
      extra=extra(params, batch_stats) if callable(extra) else extra)
