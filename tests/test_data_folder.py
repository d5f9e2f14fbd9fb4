"""A folder of images as the dataset: scikit-learn's digits written as PNGs, with an unlabeled/ pool."""

import json
import pathlib
import shutil

import jax
import numpy as np
from PIL import Image
import pytest
from sklearn import datasets as sk_datasets

from semimeta_jax import errors
from semimeta_jax import parallel
from semimeta_jax.data import catalog
from semimeta_jax.data import folder
from semimeta_jax.data import pipeline
from semimeta_jax.data import specs
from tests.conftest import tiny_config
from tests.test_cli import assert_one_clear_error
from tests.test_cli import run_main

TRAIN_PER_CLASS, TEST_PER_CLASS, NUM_UNLABELED = 20, 10, 100


def _png(array, path):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.asarray(array, np.uint8), mode='L').save(path)


def write_digits_folder(root: pathlib.Path, unlabeled=True, size=8):
  """train/<digit>/, test/<digit>/ (20 and 10 per class) and unlabeled/ (100 images, no labels)."""
  digits = sk_datasets.load_digits()
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)
  if size != 8:
    images = np.kron(images, np.ones((1, size // 8, size // 8), np.uint8))
  for label in range(10):
    rows = np.flatnonzero(digits.target == label)
    for i, row in enumerate(rows[:TRAIN_PER_CLASS]):
      _png(images[row], root / 'train' / f'digit_{label}' / f'{i:03d}.png')
    for i, row in enumerate(rows[TRAIN_PER_CLASS:TRAIN_PER_CLASS + TEST_PER_CLASS]):
      _png(images[row], root / 'test' / f'digit_{label}' / f'{i:03d}.png')
  if unlabeled:
    taken = {r for label in range(10)
             for r in np.flatnonzero(digits.target == label)[:TRAIN_PER_CLASS + TEST_PER_CLASS]}
    rest = [r for r in range(len(images)) if r not in taken][:NUM_UNLABELED]
    for i, row in enumerate(rest):
      _png(images[row], root / 'unlabeled' / f'u{i:04d}.png')
  return root


@pytest.fixture(scope='module')
def digits_folder(tmp_path_factory):
  return write_digits_folder(tmp_path_factory.mktemp('folder') / 'digits')


def folder_config(root, **overrides):
  return tiny_config(**{
      'data.folder': str(root), 'data.name': 'folder', 'data.image_size': 0,
      'data.num_labels': 50, 'labeled_batch_size': 8, 'unlabeled_batch_size': 16,
      'eval_batch_size': 32, **overrides})


def test_the_folder_reads_classes_images_and_the_unlabeled_pool(digits_folder):
  spec = catalog.get_spec(folder_config(digits_folder).data)
  assert spec.name == 'folder' and spec.num_classes == 10
  assert spec.image_shape == (8, 8, 1)
  assert spec.num_unlabeled == NUM_UNLABELED
  assert spec.sizes == (10 * TRAIN_PER_CLASS + NUM_UNLABELED, 10 * TEST_PER_CLASS)
  images, labels, test_images, test_labels = specs.registered_loader('folder')()
  assert images.shape == (10 * TRAIN_PER_CLASS + NUM_UNLABELED, 8, 8, 1)
  assert (labels[-NUM_UNLABELED:] == -1).all()
  assert np.bincount(labels[:-NUM_UNLABELED]).tolist() == [TRAIN_PER_CLASS] * 10
  assert np.bincount(test_labels).tolist() == [TEST_PER_CLASS] * 10


def test_a_resize_gives_every_image_the_configured_size(digits_folder):
  spec = catalog.get_spec(folder_config(digits_folder, **{'data.image_size': 12}).data)
  assert spec.image_shape == (12, 12, 1)


def test_the_unlabeled_stream_draws_only_from_unlabeled_rows_and_has_no_labels(
    digits_folder, tmp_path):
  config = folder_config(digits_folder)
  mesh = parallel.make_mesh()
  inp = pipeline.build_input(config, str(tmp_path), mesh=mesh)
  first_unlabeled = 10 * TRAIN_PER_CLASS
  assert inp.unlabeled_indices.tolist() == list(range(first_unlabeled,
                                                      first_unlabeled + NUM_UNLABELED))
  assert inp.labeled_indices.max() < first_unlabeled and len(inp.labeled_indices) == 50
  seen = set()
  for step in range(0, 14):  # 14 x 16 > 2 epochs of the 100 unlabeled images.
    batch = inp.train_batch(step)
    index = np.asarray(jax.device_get(batch['unlabeled']['index']))
    assert (index >= first_unlabeled).all(), index
    assert 'label' not in batch['unlabeled']
    assert set(np.asarray(batch['labeled']['index']).tolist()) <= set(inp.labeled_indices.tolist())
    assert (np.asarray(batch['labeled']['label']) >= 0).all()
    seen |= set(index.tolist())
  assert seen == set(range(first_unlabeled, first_unlabeled + NUM_UNLABELED))
  # The normalisation statistics are the labeled pool's, saved for a resume.
  saved = json.loads((tmp_path / 'normalization.json').read_text())
  images = specs.registered_loader('folder')()[0][inp.labeled_indices] / 255.0
  np.testing.assert_allclose(saved['mean'], [images.mean()], rtol=1e-6)
  np.testing.assert_allclose(saved['std'], [images.std()], rtol=1e-6)
  (tmp_path / 'normalization.json').write_text(json.dumps({'mean': [0.5], 'std': [0.25]}))
  inp = pipeline.build_input(config, str(tmp_path), mesh=mesh)
  batch = next(iter(inp.eval_batches()))
  raw = specs.registered_loader('folder')()[2][:1] / 255.0
  np.testing.assert_allclose(np.asarray(batch['image'][:1]), (raw - 0.5) / 0.25, atol=1e-5)


def test_num_labels_minus_one_labels_every_train_image(digits_folder, tmp_path):
  config = folder_config(digits_folder, **{'data.num_labels': -1})
  inp = pipeline.build_input(config, str(tmp_path), mesh=parallel.make_mesh())
  assert inp.labeled_indices.tolist() == list(range(10 * TRAIN_PER_CLASS))
  assert inp.unlabeled_indices.min() == 10 * TRAIN_PER_CLASS


@pytest.mark.slow
def test_trains_end_to_end_through_main(digits_folder, tmp_path):
  workdir = tmp_path / 'run'
  result = run_main(
      '--config=configs/folder.py', f'--config.data.folder={digits_folder}', f'--workdir={workdir}',
      '--config.data.image_size=0', '--config.data.num_labels=50', '--config.model=convlarge_digits',
      '--config.model_width=4', '--config.num_train_steps=4', '--config.warmup_steps=0',
      '--config.consistency_rampup_steps=0', '--config.lr_decay_boundaries=()',
      '--config.labeled_batch_size=16', '--config.unlabeled_batch_size=16',
      '--config.eval_batch_size=64', '--config.log_every_steps=2', '--config.eval_every_steps=4',
      '--config.checkpoint_every_steps=4', timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['completed'], summary
  assert (workdir / 'normalization.json').exists()
  metrics = (workdir / 'metrics.jsonl').read_text() if (workdir / 'metrics.jsonl').exists() else ''
  assert 'pseudo_label_entropy' in metrics and 'unlabeled_accuracy' not in metrics


# --- Bad data: one clear message before any training. -------------------------------------------


def _bad_empty(root, tmp):
  (root / 'train').mkdir(parents=True)
  (root / 'test').mkdir()
  return ['holds no images', 'train']


def _bad_no_layout(root, tmp):
  root.mkdir()
  return ['has no train/ folder', 'ROOT/train/<class>/*']


def _bad_single_class(root, tmp):
  _png(np.zeros((8, 8)), root / 'train' / 'cat' / 'a.png')
  _png(np.zeros((8, 8)), root / 'test' / 'cat' / 'a.png')
  return ['single class', "'cat'"]


def _bad_test_class(root, tmp):
  for split in ('train', 'test'):
    for name in ('a', 'b'):
      _png(np.zeros((8, 8)), root / split / name / 'x.png')
  _png(np.zeros((8, 8)), root / 'test' / 'zebra' / 'x.png')
  return ['zebra', 'no folder in train/']


def _bad_unreadable(root, tmp):
  _bad_test_class(root, tmp)
  shutil.rmtree(root / 'test' / 'zebra')
  (root / 'train' / 'a' / 'notes.txt').write_text('not an image')
  (root / 'unlabeled').mkdir()
  (root / 'unlabeled' / 'broken.png').write_bytes(b'\x89PNG garbage')
  return ['not readable images', 'train/a/notes.txt', 'unlabeled/broken.png']


def _bad_mixed_sizes(root, tmp):
  _bad_test_class(root, tmp)
  shutil.rmtree(root / 'test' / 'zebra')
  _png(np.zeros((12, 10)), root / 'train' / 'b' / 'big.png')
  return ['different sizes', '10x12', 'data.image_size']


def _bad_budget(root, tmp):
  _bad_test_class(root, tmp)
  shutil.rmtree(root / 'test' / 'zebra')
  return ['num_labels=4', "'a' has 1", '2 labeled images per class']


def _too_large(root, tmp):
  _bad_test_class(root, tmp)
  shutil.rmtree(root / 'test' / 'zebra')
  return ['2 training images take', 'max_in_memory_gb=1e-07', 'not streamed']


@pytest.mark.parametrize('make', [_bad_no_layout, _bad_empty, _bad_single_class, _bad_test_class, _bad_unreadable,
                                  _bad_mixed_sizes, _bad_budget, _too_large])
def test_bad_data_is_one_user_error_naming_it(tmp_path, make):
  root = tmp_path / 'data'
  expected = make(root, tmp_path)
  config = folder_config(root, **{'data.num_labels': 4 if make is _bad_budget else -1,
                                  'data.max_in_memory_gb': 1e-7 if make is _too_large else 4.0})
  with pytest.raises(errors.UserError) as raised:
    catalog.get_spec(config.data)
  assert isinstance(raised.value, folder.FolderDataError)
  for text in expected:
    assert text in str(raised.value), (text, str(raised.value))


@pytest.mark.slow
def test_bad_data_through_main_is_one_line_before_any_training(tmp_path):
  root = tmp_path / 'data'
  _bad_single_class(root, tmp_path)
  workdir = tmp_path / 'run'
  result = run_main('--config=configs/folder.py', f'--config.data.folder={root}',
                    f'--workdir={workdir}', timeout=300)
  assert_one_clear_error(result, 'single class', workdir=workdir)


@pytest.mark.slow
def test_the_dry_run_counts_the_unlabeled_folder_apart(digits_folder, tmp_path):
  result = run_main('--config=configs/folder.py', f'--config.data.folder={digits_folder}',
                    f'--workdir={tmp_path / "run"}', '--config.data.num_labels=-1', '--dry_run',
                    timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'folder: 200 train / 100 test / {NUM_UNLABELED} unlabeled, 10 classes' in result.stdout
  assert 'labeled       200 examples' in result.stdout
  assert f'unlabeled     {NUM_UNLABELED} examples' in result.stdout
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow
@pytest.mark.parametrize('method,extra', [('pi_model', {}), ('mean_teacher', {'ema_decay': 0.99}),
                                          ('temporal_ensembling', {}), ('vat', {})])
def test_every_method_trains_on_a_truly_unlabeled_pool_without_reading_its_labels(
    digits_folder, tmp_path, method, extra):
  from semimeta_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from semimeta_jax import train  # pylint: disable=g-import-not-at-top
  config = folder_config(digits_folder, method=method, labeled_batch_size=16, num_train_steps=2,
                         log_every_steps=1, eval_every_steps=2, checkpoint_every_steps=2,
                         mixup=False, **extra)
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert summary['completed']
  rows = metrics_lib.read_rows(str(tmp_path / 'run'))
  assert any('train/loss' in row for row in rows), rows
  for row in rows:
    assert not any('unlabeled_accuracy' in key for key in row), row


def test_a_bad_augmentation_name_is_a_config_error(digits_folder):
  with pytest.raises(errors.ConfigError, match='data.augment_kind'):
    catalog.get_spec(folder_config(digits_folder, **{'data.augment_kind': 'flip'}).data)


def test_digits_as_folder_labeled_from_a_run_gives_that_runs_labeled_images(tmp_path):
  # The like-for-like comparison's folder: the built-in run's labeled images in train/, every
  # other training image in unlabeled/, the same test split.
  from experiments import digits_as_folder  # pylint: disable=g-import-not-at-top
  from semimeta_jax.data import digits  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'builtin_run'
  workdir.mkdir()
  chosen = np.arange(0, 1497, 30)  # 50 train-split rows.
  (workdir / 'labeled_indices.json').write_text(json.dumps({'indices': chosen.tolist()}))
  digits_as_folder.write(tmp_path / 'folder', workdir)
  config = folder_config(tmp_path / 'folder', **{'data.num_labels': -1})
  spec = catalog.get_spec(config.data)
  images, labels, test_images, test_labels = specs.registered_loader('folder')()
  bunch = sk_datasets.load_digits()
  train, test = digits.split_indices()
  assert spec.num_unlabeled == 1497 - 50 and len(test_labels) == 300
  # The labeled rows are the chosen images (as multisets: the folder orders them by class).
  wanted = digits.to_uint8(bunch.images[np.asarray(train)[chosen]])
  got = images[:50]
  key = lambda a: sorted(x.tobytes() for x in a.reshape(len(a), -1))
  assert key(got) == key(wanted)
  assert sorted(labels[:50].tolist()) == sorted(bunch.target[np.asarray(train)[chosen]].tolist())
  assert key(test_images) == key(digits.to_uint8(bunch.images[np.asarray(test)]))
