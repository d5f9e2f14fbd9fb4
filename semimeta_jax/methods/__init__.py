"""Training methods: each is a pure `train_step(state, batch, *, config, num_classes)`.

A method knows the math of one update and nothing of files, devices or logging;
the training loop compiles whichever `make_train_step` returns.
"""

import functools

from semimeta_jax.methods import mean_teacher
from semimeta_jax.methods import pi_model
from semimeta_jax.methods import semimeta
from semimeta_jax.methods import supervised

_METHODS = {
    'semimeta': semimeta.train_step,
    'supervised': supervised.train_step,
    'pi_model': pi_model.train_step,
    'mean_teacher': mean_teacher.train_step,
}

METHOD_NAMES = tuple(_METHODS)
# Methods whose step reads the unlabeled stream.
USES_UNLABELED = ('semimeta', 'pi_model', 'mean_teacher')


def make_train_step(config, num_classes: int):
  """Returns `train_step(state, batch) -> (state, metrics)` for `config.method`.

  Raises:
    ValueError: if `config.method` is not a registered method.
  """
  if config.method not in _METHODS:
    raise ValueError(f'Unknown config.method {config.method!r}; expected one of {METHOD_NAMES}.')
  return functools.partial(_METHODS[config.method], config=config, num_classes=num_classes)


def uses_ema(config) -> bool:
  """Whether the state keeps an exponential moving average of the weights.

  Mean Teacher always does: the average is its teacher.
  """
  return config.method == 'mean_teacher' or config.ema_decay > 0
