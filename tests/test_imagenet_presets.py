"""The ImageNet table's rows: each preset resolves, validates and prints its plan without data."""

import pytest

from configs import imagenet
from semimeta_jax import cli
from semimeta_jax import validation
from tests.test_cli import run_main

STEPS_PER_EPOCH = 2253  # ceil(0.9 * 1281167 / 512): one pass over the unlabeled pool.
ROWS = {
    # preset: (method, labeled examples, steps, ramp-up steps)
    'labeled_only': ('supervised', 128117, 100 * STEPS_PER_EPOCH, 0),
    'fully_supervised': ('supervised', 1281167, 100 * STEPS_PER_EPOCH, 0),
    'mean_teacher': ('mean_teacher', 128117, 600 * STEPS_PER_EPOCH, 5 * STEPS_PER_EPOCH),
    'co_training': ('co_training', 128117, 600 * STEPS_PER_EPOCH, 80 * STEPS_PER_EPOCH),
    'semimeta': ('semimeta', 128117, 600 * STEPS_PER_EPOCH, 0),
}


@pytest.mark.parametrize('name', sorted(ROWS))
def test_each_row_validates_and_plans_without_data(name, tmp_path):
  method, num_labeled, steps, rampup = ROWS[name]
  config = imagenet.get_config(name)
  assert config.steps_per_epoch == STEPS_PER_EPOCH
  configured = validation.validate_config(config)
  assert (configured.method.name, config.model) == (method, 'resnet18')
  assert (config.num_train_steps, config.consistency_rampup_steps) == (steps, rampup)
  workdir = tmp_path / 'run'
  plan = cli.describe_run(config, str(workdir)).split('# Run plan\n')[1]
  assert f'method        {method}' in plan
  assert 'model         resnet18' in plan
  assert f'steps         {steps} ' in plan
  assert f'labeled       {num_labeled} examples, batch 512: {steps * 512 / num_labeled:.1f} epochs' in plan
  assert ('unlabeled     1153050 examples' in plan) == configured.uses_unlabeled
  assert not workdir.exists()


def test_the_adanet_row_keeps_its_papers_batch_and_step_schedule(tmp_path):
  config = imagenet.get_config('adanet')
  configured = validation.validate_config(config)
  assert (configured.method.name, config.model, config.labeled_batch_size) == ('adanet', 'resnet18', 256)
  assert (config.num_train_steps, tuple(config.lr_decay_boundaries)) == (300_000, (150_000, 225_000, 275_000))
  assert config.adanet.discriminator_width == 1024  # The paper's 1024-1024-2 discriminator.
  plan = cli.describe_run(config, str(tmp_path / 'run')).split('# Run plan\n')[1]
  assert 'method        adanet' in plan and 'steps         300000 ' in plan
  assert 'labeled       128117 examples, batch 256' in plan
  assert not (tmp_path / 'run').exists()


def test_the_fully_supervised_row_runs_90_epochs_of_every_label():
  config = imagenet.get_config('fully_supervised')
  assert (config.data.label_fraction, config.data.num_labels) == (0.0, -1)
  assert round(config.num_train_steps * config.labeled_batch_size / 1281167) == 90


@pytest.mark.slow
def test_the_co_training_dry_run_prints_its_plan_and_writes_nothing(tmp_path):
  workdir, data_dir = tmp_path / 'run', tmp_path / 'tfds'
  result = run_main('--config=configs/imagenet.py:co_training', f'--workdir={workdir}',
                    f'--config.data.data_dir={data_dir}', '--dry_run')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'method        co_training (lambda_cot=10.0, lambda_dif=0.5, fgsm_epsilon=0.02)' in result.stdout
  assert f'consistency_rampup_steps: {80 * STEPS_PER_EPOCH}' in result.stdout
  assert not workdir.exists() and not data_dir.exists()


def test_an_unknown_row_is_named():
  with pytest.raises(validation.ConfigError, match="config.preset='co_train'"):
    imagenet.get_config('co_train')
