"""The training options every method runs inside (`base.Option`), and what they change in the optimizer.

An option owns its config block and wraps any method's step: the exponential
moving average of the weights (`ema.py`) and fast-SWA (`fast_swa.py`). The
learning-rate schedule a step reports and the optimizer follows is the config's
main schedule with the options' tail, if one has it.
"""

import optax

from semimeta_jax import errors
from semimeta_jax import schedules
from semimeta_jax.methods import ema
from semimeta_jax.methods import fast_swa

# One line per option.
OPTIONS = (ema.OPTION, fast_swa.OPTION)


def learning_rate_tail(config):
  """The (steps, schedule) that replaces the end of the main schedule, or None.

  Raises:
    errors.ConfigError: if two options each bring one.
  """
  tails = [(option.name, option.learning_rate_tail(config)) for option in OPTIONS]
  tails = [(name, tail) for name, tail in tails if tail]
  errors.require(len(tails) <= 1, 'lr_schedule', config.lr_schedule,
                 f'only one option may replace its tail; {", ".join(n for n, _ in tails)} each do')
  return tails[0][1] if tails else None


def learning_rate_schedule(config) -> optax.Schedule:
  """The learning rate of each step: `config.lr_schedule`, then an option's tail."""
  return schedules.learning_rate_schedule(config, learning_rate_tail(config))


def optimizer(config) -> optax.GradientTransformation:
  """The run's optimizer: SGD with coupled weight decay on `learning_rate_schedule`."""
  return schedules.sgd_with_coupled_weight_decay(config, learning_rate_tail(config))
