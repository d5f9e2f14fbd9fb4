"""Every method's CIFAR-10 preset (`--config=configs/cifar10.py:NAME`) prints its run plan without data."""

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
