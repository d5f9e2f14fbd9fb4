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
    ema_params: exponential moving average of `params` (Mean Teacher's teacher,
      optional evaluation weights); `None` when no EMA is kept.
    ema_batch_stats: the batch statistics that go with `ema_params`.
    extra: the method's own state (e.g. Temporal Ensembling's per-example
      ensemble), `{}` when it keeps none.
    swa: fast-SWA's running average {'params', 'batch_stats', 'count'} (the
      statistics recomputed for the averaged weights before each evaluation);
      `None` when fast-SWA is off.
    rng: raw uint32 key data of the run's base key; per-step keys are
      `fold_in(key, step)`, so a resumed run draws the same randomness.
    apply_fn: `model.apply` (static, not saved).
    tx: the optax transformation (static, not saved).
  """

  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: optax.OptState
  ema_params: PyTree
  ema_batch_stats: PyTree
  extra: PyTree
  swa: PyTree
  rng: jax.Array
  apply_fn: Callable[..., Any] = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, *, apply_fn, params, batch_stats, tx, rng, use_ema=False, extra=None, use_swa=False):
    """Builds a fresh state at step 0.

    Args:
      apply_fn: the model's `apply`.
      params: initial parameters.
      batch_stats: initial batch statistics (`{}` if the model has none).
      tx: the optimizer.
      rng: a typed or raw PRNG key, the base of every per-step key.
      use_ema: whether to keep an EMA copy of params and batch statistics.
      extra: the method's own state (default `{}`).
      use_swa: whether to keep fast-SWA's average of the weights.
    """
    if jnp.issubdtype(jnp.asarray(rng).dtype, jax.dtypes.prng_key):
      rng = jax.random.key_data(rng)
    copy = lambda tree: jax.tree.map(jnp.array, tree)
    return cls(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        ema_params=copy(params) if use_ema else None,
        ema_batch_stats=copy(batch_stats) if use_ema else None,
        extra={} if extra is None else extra,
        swa=({'params': copy(params), 'batch_stats': copy(batch_stats),
              'count': jnp.zeros((), jnp.int32)} if use_swa else None),
        rng=rng,
        apply_fn=apply_fn,
        tx=tx)

  def step_key(self, *tags: int) -> jax.Array:
    """Returns the key for this step (and optional sub-tags): fold_in(base, step, *tags)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)
    for tag in tags:
      key = jax.random.fold_in(key, tag)
    return key

  def apply_gradients(self, *, grads, batch_stats, ema_decay=0.0):
    """Takes one optimizer step and, if an EMA is kept, updates it.

    Args:
      grads: gradients with the structure of `params`.
      batch_stats: the batch statistics after this step's forward passes.
      ema_decay: EMA decay (ignored when no EMA is kept).

    Returns:
      The state after the update, with `step` incremented.
    """
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    ema_params, ema_batch_stats = self.ema_params, self.ema_batch_stats
    if ema_params is not None:
      ema = lambda old, new: ema_decay * old + (1.0 - ema_decay) * new
      ema_params = jax.tree.map(ema, ema_params, params)
      ema_batch_stats = jax.tree.map(ema, ema_batch_stats, batch_stats)
    return self.replace(
        step=self.step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        ema_params=ema_params,
        ema_batch_stats=ema_batch_stats)


def init_train_state(config, model, image_shape, rng: jax.Array, *, tx=None, use_ema=False, extra=None,
                     use_swa=False) -> TrainState:
  """Initialises a model's variables and optimizer at step 0.

  Args:
    config: the run configuration (optimizer fields are read when `tx` is None).
    model: a Flax module called as `model.apply(variables, x, train=...)`.
    image_shape: (H, W, C) of one input.
    rng: the run's base key (typed).
    tx: the optimizer; default: SGD with coupled weight decay from `config`.
    use_ema: keep an EMA copy of the weights.
    extra: the method's own state (`methods.init_train_state` fills it).
    use_swa: keep fast-SWA's average of the weights.
  """
  init_key, dropout_key, base_key = jax.random.split(rng, 3)
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  variables = model.init({'params': init_key, 'dropout': dropout_key}, dummy, train=False)
  return TrainState.create(
      apply_fn=model.apply,
      params=variables['params'],
      batch_stats=variables.get('batch_stats', {}),
      tx=tx if tx is not None else schedules.sgd_with_coupled_weight_decay(config),
      rng=base_key,
      use_ema=use_ema,
      extra=extra,
      use_swa=use_swa)
