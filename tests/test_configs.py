"""Every config file loads and validates; a bad field fails with a message naming it."""

import importlib
import pathlib

import ml_collections
import pytest

from semimeta_jax import methods
from semimeta_jax import validation
from semimeta_jax.methods import base

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / 'configs'
CONFIG_NAMES = sorted(p.stem for p in CONFIG_DIR.glob('*.py') if p.stem != '__init__')


def load(name):
  return importlib.import_module(f'configs.{name}').get_config()


def test_the_expected_configs_exist():
  assert set(CONFIG_NAMES) >= {'default', 'digits', 'fashion_mnist', 'cifar10', 'cifar100', 'svhn',
                               'imagenet'}


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
    ('method', 'mixmatch'),
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


def test_the_default_config_composes_every_registered_block():
  config = load('default')
  for name, block in methods.config_blocks().items():
    assert config[name].to_dict() == block.to_dict(), name


def test_a_new_method_brings_its_own_block_and_preset(monkeypatch):
  """One `Method` in the registry is all a method needs: its fields and presets appear in the configs."""
  new = base.Method(
      name='newcomer', train_step=lambda state, batch, *, config, num_classes: (state, {}),
      uses_unlabeled=False,
      config_blocks=lambda: {'newcomer': ml_collections.ConfigDict({'strength': 0.5})},
      presets={'digits': {'newcomer_paper': {'newcomer.strength': 2.0}}})
  monkeypatch.setitem(methods._REGISTRY, 'newcomer', new)  # pylint: disable=protected-access
  config = importlib.import_module('configs.digits').get_config('newcomer_paper')
  assert (config.method, config.newcomer.strength) == ('newcomer', 2.0)
  assert load('default').newcomer.strength == 0.5


@pytest.mark.parametrize('dataset', ['digits', 'fashion_mnist', 'cifar10'])
def test_every_method_has_presets_that_validate(dataset):
  presets = methods.presets(dataset)
  assert {preset['method'] for preset in presets.values()} == set(methods.METHOD_NAMES)
  for name, overrides in presets.items():
    config = importlib.import_module(f'configs.{dataset}').get_config(name)
    assert config.method == overrides['method']
    configured = validation.validate_config(config)
    assert configured.method.name == overrides['method'], name


def test_fashion_mnist_presets_are_digits_with_the_image_scale_fields_replaced():
  digits, fashion = methods.presets('digits'), methods.presets('fashion_mnist')
  assert fashion.keys() == digits.keys()
  replaced = {'perturb.max_translation': 2, 'vat.epsilon': 6.0, 'data.num_labels': 59_000}
  for name, overrides in digits.items():
    assert fashion[name] == {field: replaced.get(field, value) for field, value in overrides.items()}
  assert fashion['vat_ent']['vat.epsilon'] == 6.0 and fashion['mean_teacher']['perturb.max_translation'] == 2
  assert fashion['fully_supervised']['data.num_labels'] == 60_000 - 1000  # All but the validation split.
  config = importlib.import_module('configs.fashion_mnist').get_config('vat_vadd')
  assert (config.method, config.vat.epsilon, config.consistency_rampup_steps) == ('vat_vadd', 6.0, 270)
  # The benchmark's protocol and digits' schedule, which the presets' ramps are scaled to.
  config, digits_config = load('fashion_mnist'), load('digits')
  assert (config.data.num_labels, config.data.validation_size) == (1000, 1000)
  assert config.data.unlabeled_includes_labeled
  for field in ('num_train_steps', 'warmup_steps', 'lr_decay_boundaries', 'consistency_rampup_steps',
                'labeled_batch_size', 'unlabeled_batch_size', 'learning_rate'):
    assert config[field] == digits_config[field], field


def test_a_preset_sets_its_fields_and_an_unknown_one_is_named():
  config = importlib.import_module('configs.digits').get_config('vat_ent')
  assert (config.method, config.vat.epsilon, config.vat.xi, config.vat.entropy_weight) == ('vat', 2.0, 0.0, 1.0)
  with pytest.raises(validation.ConfigError, match="config.preset='vat_entropy'"):
    importlib.import_module('configs.digits').get_config('vat_entropy')
