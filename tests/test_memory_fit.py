"""Sizes that cannot fit are refused before anything is allocated or written; a huge evaluation
batch is clamped to the evaluated split."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from semimeta_jax import memory_fit
from semimeta_jax import methods
from semimeta_jax import models
from semimeta_jax import parallel
from semimeta_jax import train
from tests.conftest import tiny_config

IMAGE_SHAPE, NUM_CLASSES, NUM_TRAIN = (8, 8, 1), 10, 100


def _nbytes(tree):
  return sum(np.asarray(leaf).nbytes if not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
             else jax.random.key_data(leaf).nbytes for leaf in jax.tree.leaves(tree))


def test_the_estimate_counts_the_real_state_and_the_module_outputs_of_one_example():
  config = tiny_config()
  method = methods.configure(config)
  fit = memory_fit.estimate(config, method, IMAGE_SHAPE, NUM_CLASSES, NUM_TRAIN, num_devices=1,
                            process_count=1)
  state = train.create_train_state(config, models.get_model(config, NUM_CLASSES), IMAGE_SHAPE,
                                   parallel.make_mesh(), num_train=NUM_TRAIN,
                                   num_classes=NUM_CLASSES, method=method)
  assert fit.state == _nbytes(state)
  # One real forward pass's module outputs, and the input, per example.
  model = models.get_model(config, NUM_CLASSES)
  image = jnp.zeros((1, *IMAGE_SHAPE), jnp.float32)
  _, captured = model.apply({'params': state.params, 'batch_stats': state.batch_stats}, image,
                            train=False, capture_intermediates=True, mutable=['intermediates'])
  per_example = _nbytes(captured['intermediates']) + image.nbytes
  examples = config.labeled_batch_size + config.unlabeled_batch_size
  assert fit.train_batch == examples * per_example
  assert fit.eval_batch == config.eval_batch_size * per_example
  assert fit.host_eval_batch == config.eval_batch_size * math.prod(IMAGE_SHAPE) * 4
  # Per device: the batch divides over the devices, the state is on each.
  on_four = memory_fit.estimate(config, method, IMAGE_SHAPE, NUM_CLASSES, NUM_TRAIN,
                                num_devices=4, process_count=1)
  assert on_four.state == fit.state and on_four.train_batch == fit.train_batch // 4


@pytest.fixture
def limits(monkeypatch):
  """Sets the free memory the check sees: {'host': bytes, 'device': bytes or None (CPU)}."""
  free = {'host': 2**30, 'device': None}
  monkeypatch.setattr(memory_fit, 'host_memory_limit', lambda: free['host'])
  monkeypatch.setattr(memory_fit, 'device_memory_limit', lambda: free['device'])
  return free


def _check(config, local_devices=1):
  memory_fit.check_fits(config, methods.configure(config), IMAGE_SHAPE, NUM_CLASSES, NUM_TRAIN,
                        num_devices=local_devices, local_devices=local_devices, process_count=1)


@pytest.mark.parametrize('overrides, field', [
    ({'model_width': 100_000}, 'config.model_width'),
    ({'labeled_batch_size': 10_000_000, 'unlabeled_batch_size': 10_000_000},
     'config.labeled_batch_size and config.unlabeled_batch_size'),
    ({'eval_batch_size': 1_000_000_000}, 'config.eval_batch_size'),
])
@pytest.mark.parametrize('device', [None, 2**30], ids=['cpu', 'accelerator'])
def test_a_run_that_cannot_fit_names_its_estimate_the_limit_and_the_field(limits, overrides, field,
                                                                          device):
  limits['device'] = device
  with pytest.raises(memory_fit.DoesNotFitError) as error:
    _check(tiny_config(**overrides))
  message = str(error.value)
  where = 'free on each device' if device else 'of host memory available'
  assert '\n' not in message and 'needs at least' in message, message
  assert f'more than the 1.0 GiB {where}' in message and f'lower {field}' in message, message


def test_the_default_sizes_fit_and_the_limit_is_the_one_compared(limits):
  config = tiny_config()
  fit = memory_fit.estimate(config, methods.configure(config), IMAGE_SHAPE, NUM_CLASSES, NUM_TRAIN,
                            num_devices=2, process_count=1)
  on_host = 2 * fit.device + fit.host_eval_batch  # Two CPU devices: both in host memory.
  limits['host'] = on_host
  _check(config, local_devices=2)
  limits['host'] = on_host - 1
  with pytest.raises(memory_fit.DoesNotFitError):
    _check(config, local_devices=2)
  limits['device'], limits['host'] = fit.device, 0  # An accelerator: its own memory counts.
  _check(config, local_devices=2)


def test_the_host_limit_is_the_smaller_of_mem_available_and_the_cgroup_room(tmp_path, monkeypatch):
  limit, usage = tmp_path / 'memory.max', tmp_path / 'memory.current'
  limit.write_text('1000000\n')
  usage.write_text('400000\n')
  monkeypatch.setattr(memory_fit, '_CGROUP_FILES', ((str(limit), str(usage)),))
  assert memory_fit.host_memory_limit() == 600_000
  limit.write_text('max\n')  # No cgroup limit: MemAvailable alone.
  available = memory_fit.host_memory_limit()
  assert available is not None and available > 600_000
  assert memory_fit.device_memory_limit() is None  # CPU devices report no memory of their own.


@pytest.mark.parametrize('requested, devices, expected', [
    (1_000_000_000, 8, 304), (1_000_000_000, 1, 300), (320, 1, 300), (296, 8, 296)])
def test_an_evaluation_batch_past_the_split_is_clamped_in_a_copy(requested, devices, expected):
  config = tiny_config(eval_batch_size=requested)
  clamped = memory_fit.clamp_eval_batch(config, 300, devices)
  assert clamped.eval_batch_size == expected and clamped.eval_batch_size % devices == 0
  assert config.eval_batch_size == requested  # The recorded config keeps the value given.
  assert (clamped is config) == (requested == expected)


def _mock_config(tmp_path, **overrides):
  return tiny_config(**{'data.name': 'cifar10', 'data.num_labels': 10,
                        'data.data_dir': str(tmp_path / 'tfds'), 'labeled_batch_size': 8,
                        'unlabeled_batch_size': 8, 'eval_batch_size': 24, **overrides})


@pytest.mark.parametrize('overrides', [
    # Tracing a million-wide model's initialisation takes seconds; the check itself is tested above.
    pytest.param({'model_width': 1_000_000}, marks=pytest.mark.slow),
    {'labeled_batch_size': 10_000_000, 'unlabeled_batch_size': 10_000_000, 'num_train_steps': 120},
], ids=['model_width', 'batch_sizes'])
def test_training_refuses_before_anything_is_written(tmp_path, overrides):
  workdir = tmp_path / 'run'
  with tfds.testing.mock_data(num_examples=40):
    with pytest.raises(memory_fit.DoesNotFitError, match='needs at least .* more than the'):
      train.train_and_evaluate(_mock_config(tmp_path, **overrides), str(workdir))
  assert not workdir.exists()


@pytest.mark.slow
@pytest.mark.parametrize('args, field', [
    (['--config.model_width=1000000'], 'config.model_width'),
    (['--config.labeled_batch_size=10000000', '--config.unlabeled_batch_size=10000000'],
     'config.labeled_batch_size'),
    (['--config.eval_batch_size=1000000000'], None),  # Clamped: the run goes on.
], ids=['model_width', 'batch_sizes', 'eval_batch_size'])
def test_the_sizes_that_failed_late_on_the_command_line(tmp_path, args, field):
  from tests.test_cli import assert_one_clear_error, run_main  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'run'
  result = run_main('--config=configs/digits.py', f'--workdir={workdir}',
                    f'--config.data.data_dir={tmp_path / "tfds"}', '--config.num_train_steps=4',
                    '--config.eval_every_steps=4', '--config.checkpoint_every_steps=4', *args)
  if field:
    assert_one_clear_error(result, 'needs at least', field, workdir=workdir)
  else:
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'evaluating them in one batch of 300' in result.stderr
    assert 'Final test error' in result.stdout
