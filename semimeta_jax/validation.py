"""Configuration checks that run before any compute, with messages that name the field.

One contract: the fields every run reads are checked here, and the method and its
options check their own through the registry (`methods.configure`: `Method.validate`
and each `Option.validate`); this module names no method and no option.
"""

import math

import ml_collections

from semimeta_jax import errors
from semimeta_jax import methods
from semimeta_jax import models
from semimeta_jax import schedules
from semimeta_jax.data import config_checks as data_config_checks


ConfigError = errors.ConfigError
_require = errors.require


def _one_of(config, field: str, choices):
  value = config
  for part in field.split('.'):
    value = value[part]
  _require(value in choices, field, value, f'expected one of {tuple(choices)}')


def _check_finite(config, prefix=''):
  # inf or nan in any float field (e.g. learning_rate=inf) passes every range check below.
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      _check_finite(value, f'{prefix}{name}.')
    elif isinstance(value, float):
      _require(math.isfinite(value), prefix + name, value, 'must be a finite number')


def validate_config(config: ml_collections.ConfigDict) -> methods.Configured:
  """Raises `ConfigError` naming the first field with an unusable value.

  The shared fields first, then `config.method`'s own (`Method.validate`) and its
  options'. Returns the configured method (`methods.configure`), checked once.

  Dataset-dependent checks (label counts against class sizes, unknown dataset
  names, data presence) are made by `semimeta_jax.data`; device-dependent ones
  (batch sizes against the mesh) by `parallel.check_batch_sizes`.
  """
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'the config is a {type(config).__name__}, not an ml_collections.ConfigDict: '
                      'make get_config() return one (see configs/default.py).')
  _check_finite(config)
  _one_of(config, 'method', methods.METHOD_NAMES)
  # Seeds equal modulo 2**32 would share their data streams (train_pools.stream_seeds).
  _require(isinstance(config.seed, int) and not isinstance(config.seed, bool)
           and 0 <= config.seed < 2**32, 'seed', config.seed, 'must be an integer in [0, 2**32 - 1]')
  _one_of(config, 'model', models.MODEL_NAMES)
  _one_of(config, 'remat', models.REMAT_POLICIES)
  _one_of(config, 'lr_schedule', schedules.SCHEDULES)
  _one_of(config, 'consistency_rampup', schedules.RAMPUPS)

  _require(config.learning_rate > 0, 'learning_rate', config.learning_rate, 'must be > 0')
  _require(0 <= config.momentum < 1, 'momentum', config.momentum, 'must be in [0, 1)')
  _require(config.weight_decay >= 0, 'weight_decay', config.weight_decay, 'must be >= 0')
  _require(config.lr_decay_factor > 0, 'lr_decay_factor', config.lr_decay_factor, 'must be > 0')
  for field in ('num_train_steps', 'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
                'keep_checkpoints', 'labeled_batch_size', 'unlabeled_batch_size', 'eval_batch_size',
                'preemption_check_every_steps', 'max_steps_in_flight'):
    _require(isinstance(config[field], int) and config[field] > 0, field, config[field],
             'must be a positive integer')
  for field in ('warmup_steps', 'consistency_rampup_steps'):
    _require(isinstance(config[field], int) and config[field] >= 0, field, config[field],
             'must be an integer >= 0')
  _require(config.consistency_weight >= 0, 'consistency_weight', config.consistency_weight, 'must be >= 0')
  _require(0 <= config.dropout_rate < 1, 'dropout_rate', config.dropout_rate, 'must be in [0, 1)')
  _require(config.model_width >= 0, 'model_width', config.model_width, 'must be >= 0 (0 = default)')

  data_config_checks.validate_data_config(config.data)
  largest = max(config.labeled_batch_size, config.unlabeled_batch_size)
  _require(config.num_train_steps * largest < 2**31, 'num_train_steps', config.num_train_steps,
           f'x batch {largest} examples overflow the int32 stream positions (2**31)')
  return methods.configure(config)

