"""Dataset preparation through TFDS's real built-in builders, offline, from files the tests write.

TFDS's `cifar10` builder is run as a user's `python -m semimeta_jax.prepare cifar10` runs it:
its checksums lookup, its download manager, the extraction of the archive and its example
generator. Only the bytes are small: a CIFAR-10 binary archive of a few images per file.
"""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import default
from semimeta_jax import data
from semimeta_jax import errors
from semimeta_jax.data import prepare

CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz'
CIFAR10_FILES = [f'data_batch_{i}.bin' for i in range(1, 6)] + ['test_batch.bin']
PER_FILE = 2  # Images in each CIFAR-10 batch file.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cifar10_archive(seed=0):
  """A cifar-10-binary.tar.gz of PER_FILE images per batch file, in CIFAR-10's binary format.

  Returns:
    (the archive's bytes, {file name: (labels, images [N, 32, 32, 3])}).
  """
  rng = np.random.RandomState(seed)
  contents, buffer = {}, io.BytesIO()
  with tarfile.open(fileobj=buffer, mode='w:gz') as tar:

    def add(name, data):
      info = tarfile.TarInfo(f'cifar-10-batches-bin/{name}')
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))

    names = 'airplane automobile bird cat deer dog frog horse ship truck'.split()
    add('batches.meta.txt', ('\n'.join(names) + '\n').encode())
    for name in CIFAR10_FILES:
      labels = rng.randint(0, 10, PER_FILE).astype(np.uint8)
      images = rng.randint(0, 256, (PER_FILE, 32, 32, 3)).astype(np.uint8)
      # One record: the label byte, then the red, green and blue planes (channel-major).
      records = [np.concatenate([[label], image.transpose(2, 0, 1).ravel()])
                 for label, image in zip(labels, images)]
      add(name, np.stack(records).astype(np.uint8).tobytes())
      contents[name] = (labels, images)
  return buffer.getvalue(), contents


def _registered(url):
  """TFDS's registered (size, sha256, filename) of `url`."""
  return tfds.core.download.checksums.get_all_url_infos()[url]


def _write_download_cache(data_dir, archive):
  """Puts `archive` where TFDS's download manager keeps a finished download of CIFAR10_URL.

  The cache is keyed by the URL and its registered checksum, and a download is
  finished when its .INFO record is beside it: the manager then uses it as it is.
  """
  downloads = data_dir / 'downloads'
  downloads.mkdir(parents=True)
  info = _registered(CIFAR10_URL)
  path = downloads / tfds.core.download.resource.get_dl_fname(CIFAR10_URL, info.checksum)
  path.write_bytes(archive)
  (downloads / (path.name + '.INFO')).write_text(json.dumps(
      {'urls': [CIFAR10_URL], 'original_fname': info.filename}))


def _prepare_command(*args):
  return subprocess.run([sys.executable, '-m', 'semimeta_jax.prepare', *map(str, args)],
                        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)


def test_cifar10_is_prepared_by_tfds_builtin_builder_from_a_finished_download(tmp_path):
  archive, contents = _cifar10_archive()
  _write_download_cache(tmp_path, archive)
  sizes = prepare.prepare('cifar10', str(tmp_path))
  assert sizes == {'train': 5 * PER_FILE, 'test': PER_FILE}
  builder = tfds.builder('cifar10', data_dir=str(tmp_path))
  test = list(tfds.as_numpy(builder.as_dataset(split='test', shuffle_files=False)))
  labels, images = contents['test_batch.bin']
  by_id = {example['id'].decode(): example for example in test}
  for index in range(PER_FILE):
    example = by_id[f'test_{index:05d}']
    np.testing.assert_array_equal(example['image'], images[index])
    assert example['label'] == labels[index]


def test_a_run_with_download_true_prepares_it_through_the_same_path(tmp_path):
  _write_download_cache(tmp_path, _cifar10_archive()[0])
  config = default.get_config().data
  config.data_dir, config.download = str(tmp_path), True
  info = data.dataset_info(config)
  assert (info.name, info.num_train, info.num_test) == ('cifar10', 5 * PER_FILE, PER_FILE)


def test_manual_files_with_other_bytes_are_one_line_naming_the_file(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  (manual / 'cifar-10-binary.tar.gz').write_bytes(_cifar10_archive()[0])
  with pytest.raises(errors.UserError) as error:
    prepare.prepare('cifar10', str(tmp_path / 'tfds'), manual_dir=str(manual))
  message = str(error.value)
  assert '\n' not in message
  assert str(manual / 'cifar-10-binary.tar.gz') in message
  assert _registered(CIFAR10_URL).checksum in message  # What it should have been.
  assert not (tmp_path / 'tfds' / 'cifar10').exists() or not any(
      (tmp_path / 'tfds' / 'cifar10').rglob('*.tfrecord*'))


@pytest.mark.slow
def test_the_prepare_command_prepares_cifar10_offline(tmp_path):
  _write_download_cache(tmp_path, _cifar10_archive()[0])
  result = _prepare_command('cifar10', f'--data_dir={tmp_path}')
  assert result.returncode == 0, result.stderr
  assert 'cifar10' in result.stdout and '10 train' in result.stdout
  assert tfds.builder('cifar10', data_dir=str(tmp_path)).info.splits['test'].num_examples == PER_FILE


@pytest.mark.slow
def test_the_prepare_command_without_network_or_files_is_one_line(tmp_path):
  (tmp_path / 'manual').mkdir()  # Empty: the archive must be downloaded, and there is no network.
  result = _prepare_command('cifar10', f'--data_dir={tmp_path / "tfds"}', f'--manual_dir={tmp_path / "manual"}')
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
  assert 'cifar-10-binary.tar.gz' in lines[0]


@pytest.mark.slow
def test_two_runs_preparing_one_data_dir_at_once_both_get_the_dataset(tmp_path):
  """Two preparations of a fresh data_dir at once: one builds, the other waits and reads it.

  Without the preparation lock both built it and TFDS's final rename of the second failed
  ("Destination ... already exists"), ending that run.
  """
  import threading  # pylint: disable=g-import-not-at-top
  from semimeta_jax.data import catalog  # pylint: disable=g-import-not-at-top
  from semimeta_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.data.name = 'digits'
  config.data.data_dir = str(tmp_path)
  spec = catalog.get_spec(config.data)
  results, start = [None, None], threading.Barrier(2)

  def prepare_one(slot):
    start.wait()
    try:
      builder = tfds_builders.get_builder(spec, config.data)
      results[slot] = builder.info.splits['test'].num_examples
    except Exception as e:  # pylint: disable=broad-except
      results[slot] = e

  threads = [threading.Thread(target=prepare_one, args=(slot,)) for slot in (0, 1)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert results == [300, 300], results
