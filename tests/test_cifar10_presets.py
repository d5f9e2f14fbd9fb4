"""Every method's preset of CIFAR-10/100, SVHN and STL-10 (`--config=configs/DATASET.py:NAME`) prints
its run plan without data."""

import pytest

from configs import cifar10
from semimeta_jax import cli
from semimeta_jax import methods


@pytest.mark.parametrize('name', sorted(methods.presets('cifar10')))
def test_each_preset_plans_its_method_without_data_or_writing(name, tmp_path):
  config = cifar10.get_config(name)
  workdir = tmp_path / 'run'
  described = cli.describe_run(config, str(workdir))
  fields, plan = described.split('# Run plan\n')
  method = methods.presets('cifar10')[name]['method']
  assert f'method: {method}' in fields
  assert plan.startswith('dataset       cifar10: 50000 train / 10000 test, 10 classes, 32x32x3')
  assert f'method        {method}' in plan
  labeled = 50000 if config.data.num_labels == -1 else 4000  # -1: every label (fully supervised).
  assert f'labeled       {labeled} examples' in plan
  assert not workdir.exists()


@pytest.mark.parametrize('dataset, header', [
    ('cifar100', 'cifar100: 50000 train / 10000 test, 100 classes, 32x32x3'),
    ('svhn', 'svhn_cropped: 73257 train / 26032 test, 10 classes, 32x32x3'),
    # STL-10 is TFDS's by name: its sizes are known once it is prepared.
    ('stl10', 'stl10: sizes unknown, 10 classes, 96x96x3'),
])
def test_each_preset_of_the_other_usb_datasets_plans_without_data_or_writing(
    dataset, header, tmp_path, caplog):
  import importlib  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(f'configs.{dataset}')
  for name, preset in sorted(methods.presets(dataset).items()):
    config = module.get_config(name)
    workdir = tmp_path / name
    plan = cli.describe_run(config, str(workdir)).split('# Run plan\n')[1]
    assert plan.startswith(f'dataset       {header}'), (name, plan.splitlines()[0])
    assert f'method        {preset["method"]}' in plan, name
    # The FixMatch family and SemiMeta + strong view build the strong view; the rest do not.
    assert ('strong view   RandAugment' in plan) == name.endswith(('match', 'uda', '_strong')), name
    assert not workdir.exists()
  # Unknown sizes clamp nothing (an evaluation batch 'larger than the 0 examples' was said before).
  assert 'larger than' not in caplog.text
