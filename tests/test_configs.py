"""Every config file loads and validates; a bad field fails with a message naming it."""

import importlib
import pathlib

import pytest

from semimeta_jax import validation

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / 'configs'
CONFIG_NAMES = sorted(p.stem for p in CONFIG_DIR.glob('*.py') if p.stem != '__init__')


def load(name):
  return importlib.import_module(f'configs.{name}').get_config()


def test_the_expected_configs_exist():
  assert set(CONFIG_NAMES) >= {'default', 'digits', 'cifar10', 'cifar100', 'svhn', 'imagenet'}


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_config_validates(name):
  validation.validate_config(load(name))


def test_paper_settings():
  assert load('cifar10').data.num_labels == 4000
  assert load('cifar100').data.num_labels == 10000
  svhn = load('svhn')
  assert (svhn.data.num_labels, svhn.semimeta.mixup_alpha, svhn.weight_decay) == (1000, 0.1, 5e-5)
  imagenet = load('imagenet')
  assert (imagenet.model, imagenet.data.label_fraction, imagenet.lr_schedule) == ('resnet18', 0.1, 'cosine')
  imagenet.num_epochs = 90  # The step counts follow the epoch fields.
  assert imagenet.num_train_steps == 90 * imagenet.steps_per_epoch


BAD_FIELDS = [
    ('method', 'fixmatch'),
    ('model', 'vit'),
    ('hypergrad.mode', 'second_order'),
    ('hypergrad.forward_mode', 'test'),
    ('hypergrad.projection', 'softmax'),
    ('hypergrad.inner_steps', 0),
    ('hypergrad.epsilon', 0.0),
    ('learning_rate', -0.1),
    ('momentum', 1.0),
    ('num_train_steps', 0),
    ('labeled_batch_size', 0),
    ('unlabeled_batch_size', 64),  # Mix-up needs equal labeled and unlabeled batches.
    ('lr_schedule', 'linear'),
    ('data.num_labels', 0),
    ('data.label_fraction', 1.5),
    ('ema.decay', 1.0),
]


@pytest.mark.parametrize('field,value', BAD_FIELDS)
def test_a_bad_field_is_named(field, value):
  config = load('default')
  target = config
  *parents, leaf = field.split('.')
  for parent in parents:
    target = target[parent]
  target[leaf] = value
  with pytest.raises(validation.ConfigError, match=f'config.{field}='):
    validation.validate_config(config)


def test_inner_steps_need_the_exact_mode():
  config = load('default')
  config.hypergrad.inner_steps = 2
  with pytest.raises(validation.ConfigError, match='exact'):
    validation.validate_config(config)
  config.hypergrad.mode = 'exact'
  validation.validate_config(config)


def test_mean_teacher_needs_an_ema():
  config = load('default')
  config.method = 'mean_teacher'
  with pytest.raises(validation.ConfigError, match='config.ema.decay='):
    validation.validate_config(config)
