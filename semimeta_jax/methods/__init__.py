"""Training methods behind one interface (`base.Method`), and the registry of `config.method`.

A method knows the math of one update and nothing of files, devices or logging;
the training loop compiles whichever `make_train_step` returns and reads the
method's attributes (`uses_unlabeled`, extra state, diagnostics) without naming it.
fast-SWA (`fast_swa.py`) is an option of every method, wrapped around its step.
"""

import functools

from semimeta_jax import errors
from semimeta_jax import state as state_lib
from semimeta_jax.methods import base
from semimeta_jax.methods import fast_swa
from semimeta_jax.methods import mean_teacher
from semimeta_jax.methods import pi_model
from semimeta_jax.methods import semimeta
from semimeta_jax.methods import supervised
from semimeta_jax.methods import temporal_ensembling
from semimeta_jax.methods import vat

Method = base.Method

# One line per method.
_REGISTRY = {method.name: method for method in (
    semimeta.METHOD,
    supervised.METHOD,
    pi_model.METHOD,
    mean_teacher.METHOD,
    temporal_ensembling.METHOD,
    vat.METHOD,
)}

METHOD_NAMES = tuple(_REGISTRY)


def get(name: str) -> base.Method:
  """The registered `Method` called `name`.

  Raises:
    errors.ConfigError: if no method has that name.
  """
  errors.require(name in _REGISTRY, 'method', name, f'expected one of {METHOD_NAMES}')
  return _REGISTRY[name]


def validate(config) -> None:
  """The checks of `config.method` and of the fast-SWA option."""
  get(config.method).validate(config)
  fast_swa.validate(config)


def make_train_step(config, num_classes: int):
  """Returns `train_step(state, batch) -> (state, metrics)` for `config.method`.

  With fast-SWA on, the step also keeps the running average of the weights.

  Raises:
    errors.ConfigError: if `config.method` is unknown or its fields are unusable.
  """
  method = get(config.method)
  method.validate(config)
  step = functools.partial(method.train_step, config=config, num_classes=num_classes)
  return fast_swa.wrap(step, config) if fast_swa.enabled(config) else step


def uses_ema(config) -> bool:
  """Whether the state keeps an exponential moving average of the weights."""
  return get(config.method).keeps_ema(config)


def init_train_state(config, model, image_shape, rng, *, num_train: int = 0, num_classes: int = 0,
                     tx=None) -> state_lib.TrainState:
  """The step-0 state with everything `config.method` and its options keep.

  Args:
    config: the run configuration.
    model: the Flax classifier.
    image_shape: (H, W, C) of one input.
    rng: the run's base key (typed).
    num_train: size of the training split (per-example buffers are this long).
    num_classes: number of classes (width of per-example buffers).
    tx: the optimizer; default from `config`.
  """
  method = get(config.method)
  return state_lib.init_train_state(
      config, model, image_shape, rng, tx=tx, use_ema=method.keeps_ema(config),
      extra=method.init_extra_state(config, num_train=num_train, num_classes=num_classes),
      use_swa=fast_swa.enabled(config))
