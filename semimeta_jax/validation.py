"""Configuration checks that run before any compute, with messages that name the field."""

import math

import ml_collections

from semimeta_jax import errors
from semimeta_jax import hypergrad
from semimeta_jax import methods
from semimeta_jax import models
from semimeta_jax import schedules

FORWARD_MODES = ('eval', 'train')


class ConfigError(errors.UserError, ValueError):
  """A configuration field has a value the run cannot use."""


def _require(condition: bool, field: str, value, expectation: str):
  if not condition:
    raise ConfigError(f'config.{field}={value!r}: {expectation}.')


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


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises `ConfigError` naming the first field with an unusable value.

  Dataset-dependent checks (label counts against class sizes, unknown dataset
  names, data presence) are made by `semimeta_jax.data`; device-dependent ones
  (batch sizes against the mesh) by `parallel.check_batch_sizes`.
  """
  _check_finite(config)
  _one_of(config, 'method', methods.METHOD_NAMES)
  _one_of(config, 'model', models.MODEL_NAMES)
  _one_of(config, 'lr_schedule', schedules.SCHEDULES)
  _one_of(config, 'consistency_rampup', schedules.RAMPUPS)
  hg = config.hypergrad
  _one_of(config, 'hypergrad.mode', hypergrad.MODES)
  _one_of(config, 'hypergrad.forward_mode', FORWARD_MODES)
  _one_of(config, 'hypergrad.projection', hypergrad.PROJECTIONS)

  _require(isinstance(hg.inner_steps, int) and hg.inner_steps >= 1, 'hypergrad.inner_steps',
           hg.inner_steps, 'must be an integer >= 1')
  _require(hg.inner_steps == 1 or hg.mode == 'exact', 'hypergrad.inner_steps', hg.inner_steps,
           f'K > 1 unrolled steps need hypergrad.mode="exact" (mode {hg.mode!r} is a K = 1 formula)')
  _require(hg.inner_lr >= 0, 'hypergrad.inner_lr', hg.inner_lr, 'must be >= 0 (0 = the learning rate)')
  _require(hg.meta_lr >= 0, 'hypergrad.meta_lr', hg.meta_lr, 'must be >= 0 (0 = the official value)')
  _require(hg.epsilon > 0, 'hypergrad.epsilon', hg.epsilon, 'must be > 0')

  _require(config.learning_rate > 0, 'learning_rate', config.learning_rate, 'must be > 0')
  _require(0 <= config.momentum < 1, 'momentum', config.momentum, 'must be in [0, 1)')
  _require(config.weight_decay >= 0, 'weight_decay', config.weight_decay, 'must be >= 0')
  _require(config.lr_decay_factor > 0, 'lr_decay_factor', config.lr_decay_factor, 'must be > 0')
  for field in ('num_train_steps', 'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
                'keep_checkpoints', 'labeled_batch_size', 'unlabeled_batch_size', 'eval_batch_size',
                'preemption_check_every_steps'):
    _require(isinstance(config[field], int) and config[field] > 0, field, config[field],
             'must be a positive integer')
  for field in ('warmup_steps', 'consistency_rampup_steps', 'hypergrad_diagnostics_every_steps'):
    _require(isinstance(config[field], int) and config[field] >= 0, field, config[field],
             'must be an integer >= 0')
  _require(config.consistency_weight >= 0, 'consistency_weight', config.consistency_weight, 'must be >= 0')
  _require(0 <= config.dropout_rate < 1, 'dropout_rate', config.dropout_rate, 'must be in [0, 1)')
  _require(config.model_width >= 0, 'model_width', config.model_width, 'must be >= 0 (0 = default)')

  if config.method == 'semimeta' and config.mixup:
    _require(config.mixup_alpha > 0, 'mixup_alpha', config.mixup_alpha, 'must be > 0')
    _require(config.labeled_batch_size == config.unlabeled_batch_size, 'unlabeled_batch_size',
             config.unlabeled_batch_size,
             f'mix-up pairs the i-th labeled with the i-th unlabeled example, so it must equal '
             f'config.labeled_batch_size={config.labeled_batch_size}')
  _require(0 <= config.ema_decay < 1, 'ema_decay', config.ema_decay, 'must be in [0, 1)')
  if config.method == 'mean_teacher':
    _require(config.ema_decay > 0, 'ema_decay', config.ema_decay, 'mean_teacher needs a teacher EMA > 0')
  if config.eval_with_ema:
    _require(config.ema_decay > 0, 'eval_with_ema', True, 'needs config.ema_decay > 0')

  data = config.data
  _require(isinstance(data.num_labels, int) and (data.num_labels == -1 or data.num_labels > 0),
           'data.num_labels', data.num_labels, 'must be a positive integer, or -1 for every label')
  _require(0 <= data.label_fraction <= 1, 'data.label_fraction', data.label_fraction, 'must be in [0, 1]')
