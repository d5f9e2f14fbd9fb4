"""Fashion-MNIST from idx files: the reader, the checks, the TFDS dataset, the messages.

The tests write small idx files of their own (and record their checksums in place of the real
ones); one test reads the real files of the Debian package dataset-fashion-mnist and is skipped
where it is not installed.
"""

import gzip
import hashlib
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from semimeta_jax.data import fashion_mnist
from semimeta_jax.data import idx_files
from semimeta_jax.data import specs
from semimeta_jax.data import tfds_arrays
from semimeta_jax.data import tfds_builders

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {'train': 30, 'test': 20}


def _numpy_idx_bytes(array):
  """An idx file's bytes written out by hand: magic 0 0 8 ndim, big-endian sizes, the data."""
  header = np.array([0, 0, 8, array.ndim], np.uint8).tobytes()
  return header + np.array(array.shape, '>u4').tobytes() + np.asarray(array, np.uint8).tobytes()


@pytest.fixture
def small_source(tmp_path, monkeypatch):
  """A folder of small Fashion-MNIST-like idx files, recorded as the expected ones.

  Returns:
    (the folder, {part: array}).
  """
  rng = np.random.RandomState(0)
  folder = tmp_path / 'source'
  folder.mkdir()
  arrays, files = {}, {}
  for split, n in SIZES.items():
    arrays[f'{split}_images'] = rng.randint(0, 256, (n, 28, 28)).astype(np.uint8)
    arrays[f'{split}_labels'] = (np.arange(n) % 10).astype(np.uint8)
  for part, (name, _, _) in fashion_mnist.FILES.items():
    content = _numpy_idx_bytes(arrays[part])
    with gzip.open(folder / name, 'wb') as f:
      f.write(content)
    files[part] = (name, hashlib.sha256(content).hexdigest(), arrays[part].shape)
  monkeypatch.setattr(fashion_mnist, 'FILES', files)
  return folder, arrays


def _data_config(tmp_path, **fields):
  return ml_collections.ConfigDict({'name': 'fashion_mnist', 'data_dir': str(tmp_path / 'tfds'),
                                    'download': False, **fields})


def _spec():
  return specs.builtin_spec(ml_collections.ConfigDict({
      'name': 'fashion_mnist', 'image_size': 0, 'train_split': '', 'test_split': '',
      'unlabeled_split': '', 'image_key': 'image', 'label_key': 'label'}))


def test_the_idx_reader_matches_the_format_written_by_hand(tmp_path):
  array = np.random.RandomState(1).randint(0, 256, (3, 5, 7)).astype(np.uint8)
  path = tmp_path / 'a.gz'
  with gzip.open(path, 'wb') as f:
    f.write(_numpy_idx_bytes(array))
  np.testing.assert_array_equal(idx_files.read_checked(path), array)
  idx_files.write(tmp_path / 'b.gz', array)  # The writer, against the same bytes.
  assert gzip.open(tmp_path / 'b.gz').read() == _numpy_idx_bytes(array)


@pytest.mark.parametrize('damage,match', [
    (lambda b: b[:-3], 'damaged: not a complete gzip file'),  # Cut short.
    (lambda b: b'not gzip at all', 'damaged: not a complete gzip file'),
])
def test_a_damaged_gzip_is_one_line_naming_it(tmp_path, damage, match):
  path = tmp_path / 'x.gz'
  idx_files.write(path, np.zeros((4, 2), np.uint8))
  path.write_bytes(damage(path.read_bytes()))
  with pytest.raises(idx_files.IdxFileError, match=match) as error:
    idx_files.read_checked(path)
  assert str(path) in str(error.value) and '\n' not in str(error.value)


@pytest.mark.parametrize('content,match', [
    (b'\0\0\x0d\x01' + (4).to_bytes(4, 'big') + bytes(16), 'not a uint8 idx file'),  # float32.
    (b'\0\0\x08\x02' + (4).to_bytes(4, 'big'), 'header is cut short'),
    (b'\0\0\x08\x01' + (5).to_bytes(4, 'big') + bytes(4), r'damaged: 12 bytes, its header \(5,\) says 13'),
])
def test_a_bad_idx_header_is_one_line_naming_it(tmp_path, content, match):
  path = tmp_path / 'x.gz'
  with gzip.open(path, 'wb') as f:
    f.write(content)
  with pytest.raises(idx_files.IdxFileError, match=match) as error:
    idx_files.read_checked(path)
  assert str(path) in str(error.value)


def test_fashion_mnist_is_built_from_the_idx_files_in_their_order(tmp_path, small_source):
  folder, arrays = small_source
  config = _data_config(tmp_path, source_dir=str(folder))
  builder = tfds_builders.get_builder(_spec(), config)  # Not prepared: built from the files.
  for split in SIZES:
    images, labels = tfds_arrays.load_split(builder, split, _spec())
    np.testing.assert_array_equal(images[..., 0], arrays[f'{split}_images'])
    np.testing.assert_array_equal(labels, arrays[f'{split}_labels'])


def test_a_wrong_file_is_one_line_naming_it_and_nothing_is_written(tmp_path, small_source):
  folder, _ = small_source
  name = fashion_mnist.FILES['test_labels'][0]
  idx_files.write(folder / name, np.full(SIZES['test'], 3, np.uint8))  # Right shape, other labels.
  with pytest.raises(idx_files.IdxFileError) as error:
    tfds_builders.get_builder(_spec(), _data_config(tmp_path, source_dir=str(folder)))
  message = str(error.value)
  assert str(folder / name) in message and 'decompressed sha256' in message and '\n' not in message
  assert not (tmp_path / 'tfds').exists()


def test_a_missing_file_is_named(tmp_path, small_source):
  folder, _ = small_source
  os.remove(folder / 'train-labels-idx1-ubyte.gz')
  with pytest.raises(idx_files.IdxFileError, match='but not train-labels-idx1-ubyte.gz'):
    tfds_builders.get_builder(_spec(), _data_config(tmp_path, source_dir=str(folder)))


def test_a_named_source_dir_without_the_files_is_an_error_not_a_download(tmp_path):
  with pytest.raises(idx_files.IdxFileError, match='holds none of Fashion-MNIST'):
    tfds_builders.get_builder(_spec(), _data_config(tmp_path, source_dir=str(tmp_path),
                                                    download=True))


def test_without_the_package_or_a_download_the_message_says_how_to_get_it(tmp_path, monkeypatch):
  monkeypatch.setattr(fashion_mnist, 'DEFAULT_SOURCE_DIR', str(tmp_path / 'absent'))
  with pytest.raises(specs.DatasetNotFoundError) as error:
    tfds_builders.get_builder(_spec(), _data_config(tmp_path))
  message = str(error.value)
  assert 'apt-get install dataset-fashion-mnist' in message and '\n' not in message
  assert 'python -m semimeta_jax.prepare fashion_mnist' in message


@pytest.mark.skipif(not os.path.isdir(fashion_mnist.DEFAULT_SOURCE_DIR),
                    reason=f'the Debian package dataset-fashion-mnist is not installed '
                           f'({fashion_mnist.DEFAULT_SOURCE_DIR} is absent)')
def test_the_real_files_have_the_recorded_checksums_and_fashion_mnists_counts():
  folder = fashion_mnist.DEFAULT_SOURCE_DIR
  arrays = fashion_mnist.read_arrays(
      {part: os.path.join(folder, name) for part, (name, _, _) in fashion_mnist.FILES.items()})
  np.testing.assert_array_equal(np.bincount(arrays['train_labels']), np.full(10, 6000))
  np.testing.assert_array_equal(np.bincount(arrays['test_labels']), np.full(10, 1000))
  assert arrays['train_images'].mean() == pytest.approx(72.94035, abs=1e-4)
  # The spec's normalisation is the training images' own.
  spec = _spec()
  assert spec.mean[0] == pytest.approx(arrays['train_images'].mean() / 255, abs=1e-7)
  assert spec.std[0] == pytest.approx((arrays['train_images'] / 255.0).std(), abs=1e-7)


@pytest.mark.slow
def test_the_prepare_command_names_a_wrong_file_in_one_line(tmp_path, small_source):
  folder, _ = small_source  # The command reads the real checksums: these files are "wrong".
  result = subprocess.run(
      [sys.executable, '-m', 'semimeta_jax.prepare', 'fashion_mnist', f'--data_dir={tmp_path / "t"}',
       f'--manual_dir={folder}'], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and str(folder / 'train-images-idx3-ubyte.gz') in lines[0], result.stderr
  assert 'not the expected file' in lines[0]

