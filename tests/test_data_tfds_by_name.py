"""Any TFDS dataset by name, a truly unlabeled split, and size-aware input, on mock data."""

import json
import os
import pathlib
import subprocess
import sys

from configs import default
from configs import stl10
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from semimeta_jax import data
from semimeta_jax import errors
from semimeta_jax.data import catalog
from semimeta_jax.data import digits
from semimeta_jax.data import specs
from semimeta_jax.data import tfds_arrays
from semimeta_jax.data import tfds_builders

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_MOCK = 24  # Examples in every mock split (train, unlabelled and test alike).


def _stl10(**overrides):
  config = stl10.get_config()
  config.data.image_size = 16  # Resized: keeps the tests fast, and exercises the resize.
  config.labeled_batch_size = 8
  config.unlabeled_batch_size = 8
  config.eval_batch_size = 16
  for key, value in overrides.items():
    config.data[key] = value
  return config


def _build(config, workdir=None):
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    inp = data.build_input(config, workdir, process_index=0, process_count=1)
    batches = [jax.device_get(inp.train_batch(step)) for step in range(6)]
    evals = list(inp.eval_batches())
  return inp, batches, evals


def _read(split, config):
  """(images, labels) of a mock split at the configured size, read directly."""
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    spec = catalog.get_spec(config.data)
    return tfds_arrays.load_split(tfds.builder('stl10'), split, spec)


@pytest.mark.parametrize('max_in_memory_gb', [4.0, 1e-9], ids=['on_devices', 'streamed'])
def test_the_unlabeled_stream_reads_the_unlabeled_split_alone(max_in_memory_gb):
  config = _stl10(max_in_memory_gb=max_in_memory_gb)
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    spec = catalog.get_spec(config.data)
  assert spec.in_memory == (max_in_memory_gb > 1)  # 48 images of 16x16x3: 36 kB.
  inp, batches, evals = _build(config)
  # Rows 0..23 are the train split (all labeled: num_labels=-1), 24..47 the unlabelled split.
  assert inp.info.num_train == 2 * NUM_MOCK and inp.info.num_classes == 10
  np.testing.assert_array_equal(inp.labeled_indices, np.arange(NUM_MOCK))
  np.testing.assert_array_equal(inp.unlabeled_indices, np.arange(NUM_MOCK, 2 * NUM_MOCK))
  for batch in batches:
    assert 'label' not in batch['unlabeled']  # No labels to leak into metrics.
    assert np.all(batch['unlabeled']['index'] >= NUM_MOCK)
    assert np.all(batch['labeled']['index'] < NUM_MOCK)
    assert batch['unlabeled']['image'].shape == (8, 16, 16, 3)
  seen = np.concatenate([b['unlabeled']['index'] for b in batches[:3]])
  np.testing.assert_array_equal(np.sort(seen), np.arange(NUM_MOCK, 2 * NUM_MOCK))  # One epoch.
  assert sum(int(e['mask'].sum()) for e in evals) == NUM_MOCK


def test_unlabeled_rows_are_the_unlabeled_splits_images():
  config = _stl10(max_in_memory_gb=4.0)
  config.data.augment = False
  workdir = None
  inp, batches, _ = _build(config, workdir)
  images, _ = _read('unlabelled', config)
  train_images, train_labels = _read('train', config)
  spec = catalog.get_spec(config.data)
  mean = train_images.reshape(-1, 3).mean(0) / 255.0
  std = (train_images.reshape(-1, 3) / 255.0).std(0)
  for batch in batches[:3]:
    pixels = (batch['unlabeled']['image'] * std + mean) * 255.0
    np.testing.assert_allclose(pixels, images[batch['unlabeled']['index'] - NUM_MOCK], atol=0.05)
    np.testing.assert_array_equal(batch['labeled']['label'], train_labels[batch['labeled']['index']])
  assert spec.resize and spec.image_shape == (16, 16, 3)


def test_normalization_is_the_labeled_pools_and_is_kept_for_a_resume(tmp_path):
  config = _stl10(max_in_memory_gb=4.0)
  config.data.num_labels = 10  # One per class: the statistics are those ten images'.
  _build(config, str(tmp_path))
  saved = json.loads((tmp_path / 'normalization.json').read_text())
  labeled = np.array(json.loads((tmp_path / 'labeled_indices.json').read_text())['indices'])
  train_images, _ = _read('train', config)
  pixels = train_images[labeled].reshape(-1, 3) / 255.0
  np.testing.assert_allclose(saved['mean'], pixels.mean(0), rtol=1e-6)
  np.testing.assert_allclose(saved['std'], pixels.std(0), rtol=1e-6)
  assert saved['source'] == 'labeled pool'


def test_split_expressions_choose_the_rows(tmp_path):
  # A held-out validation share of the train split as the test split (mock data ignores
  # slicing, so the real digits: 1497 train images).
  digits.Digits(data_dir=str(tmp_path)).download_and_prepare()
  config = default.get_config()
  config.data.update(name='digits', data_dir=str(tmp_path), num_labels=-1,
                     train_split='train[:1000]', test_split='train[1000:]')
  config.labeled_batch_size = config.unlabeled_batch_size = 8
  config.eval_batch_size = 16
  inp = data.build_input(config, None, process_index=0, process_count=1, uses_unlabeled=False)
  assert (inp.info.num_train, inp.num_eval_examples) == (1000, 497)
  assert catalog.prepared_sizes(config.data) == (1000, 497, 0)


def test_a_registered_dataset_takes_an_unlabeled_split():
  config = default.get_config()  # SVHN with its 'extra' split as the unlabeled pool.
  config.data.update(name='svhn', num_labels=-1, unlabeled_split='extra')
  config.labeled_batch_size = config.unlabeled_batch_size = 8
  config.eval_batch_size = 16
  with tfds.testing.mock_data(num_examples=40):
    inp = data.build_input(config, None, process_index=0, process_count=1)
    batch = jax.device_get(inp.train_batch(0))
  assert inp.info.num_train == 80
  assert np.all(batch['unlabeled']['index'] >= 40) and 'label' not in batch['unlabeled']


@pytest.mark.parametrize('overrides,error,match', [
    ({'name': 'no_such_dataset'}, specs.UnknownDatasetError, "name='no_such_dataset'"),
    ({'image_key': 'picture'}, errors.ConfigError, r"image_key='picture'.*has \['image', 'label'\]"),
    ({'label_key': 'image'}, errors.ConfigError, "label_key='image' is a Image, not a TFDS ClassLabel"),
    ({'name': 'oxford_flowers102', 'image_size': 0}, errors.ConfigError, 'vary in size'),
    ({'augment_kind': 'flip'}, errors.ConfigError, 'data.augment_kind'),
])
def test_a_dataset_the_config_does_not_fit_is_one_clear_error(overrides, error, match):
  config = _stl10(**overrides)
  with pytest.raises(error, match=match):
    catalog.get_spec(config.data)


def _mock_main(workdir, *flags):
  """`python -m semimeta_jax.main` on mock TFDS data (a fresh process, the real command line)."""
  script = ('import runpy, sys\n'
            'import tensorflow_datasets as tfds\n'
            f'sys.argv = ["semimeta_jax.main", *{list(flags)!r}]\n'
            f'with tfds.testing.mock_data(num_examples={NUM_MOCK}):\n'
            '  runpy.run_module("semimeta_jax.main", run_name="__main__")\n')
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, '-c', script], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)


@pytest.mark.slow
def test_configs_stl10_trains_end_to_end_on_mock_data(tmp_path):
  workdir = tmp_path / 'stl10'
  result = _mock_main(
      workdir, '--config=configs/stl10.py', f'--workdir={workdir}',
      '--config.data.image_size=16', '--config.model=convlarge_digits', '--config.model_width=4',
      '--config.labeled_batch_size=8', '--config.unlabeled_batch_size=8',
      '--config.eval_batch_size=16', '--config.num_train_steps=4', '--config.warmup_steps=0',
      '--config.lr_decay_boundaries=()', '--config.log_every_steps=2',
      '--config.eval_every_steps=4', '--config.checkpoint_every_steps=4')
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['completed'] and summary['steps'] == 4
  assert summary['num_eval_examples'] == NUM_MOCK
  assert 0.0 <= summary['final_error_top1'] <= 100.0
  assert json.loads((workdir / 'normalization.json').read_text())['dataset'] == 'stl10'
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert any('eval/error_top1' in row for row in rows)


@pytest.mark.parametrize('max_in_memory_gb,where', [(4.0, 'on the devices'), (1e-9, 'streamed')])
def test_the_dry_run_plan_counts_the_unlabeled_split_and_says_where_the_data_lives(
    tmp_path, max_in_memory_gb, where):
  from semimeta_jax import plan  # pylint: disable=g-import-not-at-top
  config = _stl10(max_in_memory_gb=max_in_memory_gb)
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    text = plan.run_plan(config, str(tmp_path / 'new'))
  assert f'stl10: {NUM_MOCK} train / {NUM_MOCK} test / {NUM_MOCK} unlabeled, 10 classes' in text
  assert f'16x16x3 {where}' in text
  assert f'unlabeled     {NUM_MOCK} examples' in text


def test_a_split_the_dataset_lacks_is_one_error_naming_the_field(tmp_path):
  digits.Digits(data_dir=str(tmp_path)).download_and_prepare()
  config = default.get_config()
  config.data.update(name='digits', data_dir=str(tmp_path), test_split='validation[:50%]')
  with pytest.raises(errors.ConfigError,
                     match=r"test_split='validation\[:50%\]': 'digits' has no split 'validation'; "
                           r"its splits are \['test', 'train'\]"):
    tfds_builders.get_builder(catalog.get_spec(config.data), config.data)
