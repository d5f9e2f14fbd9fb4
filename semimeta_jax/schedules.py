"""Learning-rate and consistency-weight schedules: functions of the step, usable by optax."""

import jax.numpy as jnp
import numpy as np
import optax

SCHEDULES = ('step', 'cosine')
RAMPUPS = ('linear', 'sigmoid')


def warmup_step_decay(base_lr: float, warmup_steps: int, boundaries, factor: float) -> optax.Schedule:
  """The official CIFAR/SVHN schedule.

  lr(t) = base_lr * t / warmup_steps while t < warmup_steps, then base_lr times
  `factor` for every boundary b with t > b (the official code decays *after* b).

  Args:
    base_lr: the peak learning rate.
    warmup_steps: length of the linear warm-up from 0 (0 = no warm-up).
    boundaries: steps after which the rate is multiplied by `factor`.
    factor: the decay factor.
  """
  # numpy, not jnp: the schedule may be built inside a traced function and must not
  # capture a tracer.
  boundaries = np.asarray(sorted(boundaries) or [np.iinfo(np.int32).max], np.int32)

  def schedule(count):
    count = jnp.asarray(count)
    decays = jnp.sum(count > boundaries)
    lr = base_lr * jnp.power(factor, decays)
    if warmup_steps > 0:
      lr = jnp.where(count < warmup_steps, base_lr * count / warmup_steps, lr)
    return lr

  return schedule


def _main_schedule(config, main_steps: int) -> optax.Schedule:
  if config.lr_schedule == 'step':
    return warmup_step_decay(config.learning_rate, config.warmup_steps,
                             config.lr_decay_boundaries, config.lr_decay_factor)
  if config.lr_schedule == 'cosine':
    # ImageNet recipe: linear warm-up, then cosine decay to zero at the end of the main schedule.
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(main_steps, config.warmup_steps + 1), end_value=0.0)
  raise ValueError(f'config.lr_schedule={config.lr_schedule!r}; expected one of {SCHEDULES}.')


def learning_rate_schedule(config, tail=None) -> optax.Schedule:
  """The learning-rate schedule named by `config.lr_schedule`, then `tail` if given.

  Args:
    config: the run configuration.
    tail: None, or (steps, schedule): `schedule` (a function of the step) takes
      over for the last `steps` of `num_train_steps`, and the main schedule fills
      the steps before (a training option's cycles, `methods.options`).
  """
  tail_steps, tail_schedule = tail if tail else (0, None)
  main = _main_schedule(config, config.num_train_steps - tail_steps)
  if not tail_steps:
    return main
  start = config.num_train_steps - tail_steps
  return lambda count: jnp.where(jnp.asarray(count) < start, main(count), tail_schedule(count))


def consistency_weight_schedule(config) -> optax.Schedule:
  """w(t): `config.consistency_weight` ramped up over `config.consistency_rampup_steps`.

  'linear' is SemiMeta's w * min(1, t / T); 'sigmoid' is the exp(-5 (1 - t/T)^2)
  ramp of the Pi-model and Mean Teacher papers.
  """
  weight, rampup = config.consistency_weight, config.consistency_rampup_steps

  def schedule(count):
    if rampup <= 0:
      return jnp.asarray(weight, jnp.float32)
    progress = jnp.clip(jnp.asarray(count, jnp.float32) / rampup, 0.0, 1.0)
    if config.consistency_rampup == 'linear':
      return weight * progress
    if config.consistency_rampup == 'sigmoid':
      return weight * jnp.exp(-5.0 * jnp.square(1.0 - progress))
    raise ValueError(f'config.consistency_rampup={config.consistency_rampup!r}; expected one of {RAMPUPS}.')

  return schedule


def sgd_with_coupled_weight_decay(config, tail=None) -> optax.GradientTransformation:
  """PyTorch's SGD(momentum, weight_decay): L2 added to the gradient before momentum.

  `tail` as in `learning_rate_schedule`.
  """
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(learning_rate_schedule(config, tail), momentum=config.momentum or None))
