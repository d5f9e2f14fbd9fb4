"""`fashion_mnist`: Zalando's Fashion-MNIST from its four original idx files, as a TFDS dataset.

Fashion-MNIST (Xiao, Rasul and Vollgraf 2017): 60,000 training and 10,000 test
28x28 grayscale images of 10 kinds of clothing, 6,000 and 1,000 per class.

Where the files come from, in this order:

  * `source_dir` (`config.data.source_dir`; default `DEFAULT_SOURCE_DIR`, where the
    Debian/Ubuntu package `dataset-fashion-mnist` puts them): read offline,
    prepared on first use like `digits`;
  * else, where downloading is allowed, the URLs whose gzip checksums TFDS
    registers for its own `fashion_mnist`, through TFDS's download manager.

Either way each file's decompressed bytes must have the sha256 recorded here
(`SHA256`, computed from the Debian package's files, which hold the same arrays
as Zalando's: the same counts per class and mean pixel 72.94): a wrong or
damaged file is one line naming it, before anything is written. The
compressed bytes may differ (the Debian files do from TFDS's registered ones).

Stored unshuffled in the idx files' order, so index `i` of either split is the
same image wherever it was prepared from. Saved under the TFDS name
`fashion_mnist_idx` (TFDS's own `fashion_mnist` stores a shuffled order).
"""

import os

import numpy as np
import tensorflow_datasets as tfds

from semimeta_jax.data import idx_files

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
DEFAULT_SOURCE_DIR = '/usr/share/datasets/fashion-mnist'
# Where TFDS's own fashion_mnist downloads them (their gzip checksums are registered in TFDS).
URL = 'http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/'
# Part -> (file name, sha256 of the decompressed file, array shape).
FILES = {
    'train_images': ('train-images-idx3-ubyte.gz',
                     'c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888', (60000, 28, 28)),
    'train_labels': ('train-labels-idx1-ubyte.gz',
                     'bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9', (60000,)),
    'test_images': ('t10k-images-idx3-ubyte.gz',
                    '5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b', (10000, 28, 28)),
    'test_labels': ('t10k-labels-idx1-ubyte.gz',
                    '0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34', (10000,)),
}
SHA256 = {name: sha for name, sha, _ in FILES.values()}
INSTALL_HINT = ('apt-get install dataset-fashion-mnist (Debian/Ubuntu), or the four files of '
                'github.com/zalandoresearch/fashion-mnist (data/fashion)')


def source_dir_of(data_config) -> str:
  """`config.data.source_dir` with `~` expanded, or the Debian package's folder."""
  return os.path.expanduser(data_config.get('source_dir') or DEFAULT_SOURCE_DIR)


def has_sources(source_dir, *, required: bool) -> bool:
  """Whether `source_dir` holds the idx files (at least one of them: the rest must then be there).

  Args:
    source_dir: the folder.
    required: the folder was named by the user, so not finding the files there is an error
      rather than a reason to download them.

  Raises:
    idx_files.IdxFileError: some but not all files are there, or `required` and none is.
  """
  names = [name for name, _, _ in FILES.values()]
  present = [n for n in names if os.path.isfile(os.path.join(source_dir, n))]
  if present and len(present) < len(names):
    missing = [n for n in names if n not in present]
    raise idx_files.IdxFileError(
        f'{source_dir} holds {", ".join(present)} but not {", ".join(missing)}: '
        f'Fashion-MNIST needs all four ({INSTALL_HINT}).')
  if not present and required:
    raise idx_files.IdxFileError(
        f'config.data.source_dir={source_dir} holds none of Fashion-MNIST\'s idx files '
        f'({", ".join(names)}): {INSTALL_HINT}.')
  return bool(present)


def read_arrays(paths) -> dict[str, np.ndarray]:
  """{part: array} of the four files at `paths` ({part: path}), each checked against `FILES`.

  Raises:
    idx_files.IdxFileError: a file missing, damaged, or with other contents (named).
  """
  arrays = {}
  for part, (_, sha256, shape) in FILES.items():
    arrays[part] = idx_files.read_checked(os.fspath(paths[part]), sha256, shape)
  return arrays


class FashionMnistIdx(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST in its idx files' order, from `source_dir` or downloaded."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'The original idx files, unshuffled, their contents checked.'}

  def __init__(self, *, source_dir=None, **kwargs):
    """As any TFDS builder's, with `source_dir`: the idx files' folder (None: the Debian one).

    A folder other than the default must hold the files: they are not then downloaded.
    """
    self._source_dir = os.path.normpath(os.path.expanduser(source_dir or DEFAULT_SOURCE_DIR))
    self._source_required = self._source_dir != DEFAULT_SOURCE_DIR
    self._arrays = None
    super().__init__(**kwargs)

  @property
  def url_infos(self):
    """TFDS's registered (size, gzip sha256, name) of the downloads, which it then checks."""
    registered = tfds.core.download.checksums.get_all_url_infos()
    return {URL + name: registered[URL + name] for name, _, _ in FILES.values()
            if URL + name in registered}

  def check_sources(self) -> bool:
    """Reads and checks the files of `source_dir` if it has them; whether it had them.

    Raises:
      idx_files.IdxFileError: a file missing, damaged or with other contents (named),
        or none there when `source_dir` was named.
    """
    if self._arrays is None and has_sources(self._source_dir, required=self._source_required):
      self._arrays = read_arrays(
          {part: os.path.join(self._source_dir, name) for part, (name, _, _) in FILES.items()})
    return self._arrays is not None

  def _info(self):
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=IMAGE_SHAPE),
            'label': tfds.features.ClassLabel(names=[
                'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
                'Sneaker', 'Bag', 'Ankle boot']),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/zalandoresearch/fashion-mnist',
        disable_shuffling=True,  # Index i is the idx files' i-th image on every machine.
    )

  def _split_generators(self, dl_manager):
    if not self.check_sources():
      paths = dl_manager.download({part: URL + name for part, (name, _, _) in FILES.items()})
      self._arrays = read_arrays(paths)
    arrays = self._arrays
    return {split: self._generate_examples(arrays[f'{split}_images'], arrays[f'{split}_labels'])
            for split in ('train', 'test')}

  def _generate_examples(self, images, labels):
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {'image': image[..., None], 'label': int(label)}


def not_found_message(data_dir, source_dir) -> str:
  """Why Fashion-MNIST is not there and how to get it, in one line."""
  return (f'dataset \'fashion_mnist\' is not prepared in {data_dir} and its idx files are not in '
          f'{source_dir}: {INSTALL_HINT} (then config.data.source_dir, if elsewhere), or prepare '
          'it where there is a network: `python -m semimeta_jax.prepare fashion_mnist '
          f'--data_dir={data_dir}`, or --config.data.download=True.')
