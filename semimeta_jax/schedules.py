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


def fast_swa_tail_steps(config) -> int:
  """Steps of fast-SWA's cyclic tail: the last ones of `num_train_steps` (0 when off)."""
  swa = config.fast_swa
  return swa.cycles * swa.cycle_steps if swa.cycles > 0 else 0


def cyclic_cosine(start: int, cycle_steps: int, lr_max: float, lr_min: float) -> optax.Schedule:
  """fast-SWA's tail from step `start` on: every cycle a cosine from lr_max down to lr_min."""

  def schedule(count):
    phase = jnp.mod(jnp.asarray(count) - start, cycle_steps).astype(jnp.float32) / cycle_steps
    return lr_min + 0.5 * (lr_max - lr_min) * (1.0 + jnp.cos(jnp.pi * phase))

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


def learning_rate_schedule(config) -> optax.Schedule:
  """The learning-rate schedule named by `config.lr_schedule`, then fast-SWA's tail if on.

  The main schedule fills the first `num_train_steps - fast_swa_tail_steps` steps.
  """
  tail = fast_swa_tail_steps(config)
  main = _main_schedule(config, config.num_train_steps - tail)
  if not tail:
    return main
  start = config.num_train_steps - tail
  swa = config.fast_swa
  cyclic = cyclic_cosine(start, swa.cycle_steps, swa.lr_max, swa.lr_min)
  return lambda count: jnp.where(jnp.asarray(count) < start, main(count), cyclic(count))


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


def sgd_with_coupled_weight_decay(config) -> optax.GradientTransformation:
  """PyTorch's SGD(momentum, weight_decay): L2 added to the gradient before momentum."""
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(learning_rate_schedule(config), momentum=config.momentum or None))
