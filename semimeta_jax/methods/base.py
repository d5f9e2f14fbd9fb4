"""The Method interface: what the training loop, the data layer and validation read.

A method is one module that builds one `Method` value; `methods/__init__.py` maps
`config.method` to it. The loop binds the attributes and never names a method, so
adding one is a file, a registry line and a config.
"""

import dataclasses
from typing import Any, Callable, Optional

PyTree = Any
# (state, batch, *, config, num_classes) -> (state, metrics): pure, jit-able.
TrainStep = Callable[..., tuple[Any, dict]]


def no_checks(config) -> None:
  """The `validate` of a method without fields of its own."""
  del config


def no_extra_state(config, *, num_train: int, num_classes: int) -> PyTree:
  """The `init_extra_state` of a method that keeps nothing beyond the weights."""
  del config, num_train, num_classes
  return {}


def ema_when_configured(config) -> bool:
  """The `keeps_ema` default: an EMA is kept (for evaluation) when `ema_decay > 0`."""
  return config.ema_decay > 0


def never(config) -> int:
  """The `diagnostics_every_steps` of a method without diagnostics."""
  del config
  return 0


@dataclasses.dataclass(frozen=True)
class Method:
  """One training method, as the loop sees it.

  Attributes:
    name: the value of `config.method` that selects it.
    train_step: `(state, batch, *, config, num_classes) -> (state, metrics)`, pure.
      `batch` is {'labeled': {'image', 'label', 'index'}, 'unlabeled': {...}}.
    uses_unlabeled: whether the step reads the unlabeled stream (the data layer
      builds it only then).
    validate: `(config) -> None`, raises `errors.ConfigError` naming the field;
      the method's own checks, called by `validation.validate_config`.
    keeps_ema: `(config) -> bool`, whether the state keeps an EMA of the weights.
    init_extra_state: `(config, *, num_train, num_classes) -> pytree` kept in
      `TrainState.extra` (per-example buffers); replicated and checkpointed.
    diagnostics: optional `(state, batch, *, config) -> {name: scalar}`, run by
      the loop on the state a step is about to update.
    diagnostics_every_steps: `(config) -> int`, its cadence (0 = off).
    diagnostics_prefix: the metric prefix of the diagnostics.
  """
  name: str
  train_step: TrainStep
  uses_unlabeled: bool
  validate: Callable[[Any], None] = no_checks
  keeps_ema: Callable[[Any], bool] = ema_when_configured
  init_extra_state: Callable[..., PyTree] = no_extra_state
  diagnostics: Optional[Callable[..., dict]] = None
  diagnostics_every_steps: Callable[[Any], int] = never
  diagnostics_prefix: str = 'diagnostics'
