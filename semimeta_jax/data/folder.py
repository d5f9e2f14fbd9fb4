"""A folder of images as an in-memory dataset: `config.data.folder=ROOT`.

Layout::

    ROOT/train/<class>/*   labeled training images, one folder per class
    ROOT/test/<class>/*    evaluation images (every class must be a train class)
    ROOT/unlabeled/*       optional: images that never had labels (any depth)

The class list is the sorted names of the folders in `ROOT/train`. Images are
read with PIL (16-bit grayscale scaled to 8 bits, `value >> 8`), converted to
grayscale when every image is grayscale (else RGB) and resized to
`config.data.image_size` x `config.data.image_size` when it is > 0 (otherwise
every image must have the same size). Everything is checked
before any training; a mistake is one `FolderDataError` naming the files.

The arrays are registered through `specs.register_in_memory` under the name
'folder': the training rows are the train images followed by the unlabeled
ones (label -1), and `DatasetSpec.num_unlabeled` says how many rows at the end
form the truly unlabeled pool. The spec carries no normalisation statistics:
`pipeline.build_input` computes them from the labeled pool and saves them in
the run directory (`normalization.json`).

TensorFlow-free (PIL and NumPy only).
"""

import dataclasses
import os
import pathlib

from absl import logging
import numpy as np

from semimeta_jax import errors
from semimeta_jax.data import specs

NAME = 'folder'
# After `_eight_bit`: 16-bit images are 'L' by then, 32-bit ones refused.
_GRAY_MODES = ('1', 'L', 'LA')
_SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N')
_MAX_NAMED = 5
# (root, image size) -> loaded arrays: `get_spec` is called several times per run.
_CACHE: dict = {}


class FolderDataError(errors.UserError, ValueError):
  """The image folder cannot be used as a dataset; the message names the problem and files."""


@dataclasses.dataclass(frozen=True)
class FolderData:
  class_names: tuple[str, ...]
  train_images: np.ndarray  # uint8 [N, H, W, C]
  train_labels: np.ndarray  # int64 [N]
  test_images: np.ndarray
  test_labels: np.ndarray
  unlabeled_images: np.ndarray  # uint8 [U, H, W, C], U may be 0


def _check_link(path: pathlib.Path, root: pathlib.Path, ancestors: tuple[str, ...]):
  """Refuses a symbolic link that leads out of the dataset root, dangles or closes a loop.

  `ancestors` are the real paths of the folders that contain `path`: a link to
  one of them would list the same images again, endlessly.
  """
  target = os.path.realpath(path)
  problem = None
  if os.path.commonpath([str(root), target]) != str(root):
    problem = 'leads out of the dataset folder'
  elif not os.path.exists(target):
    problem = 'points to nothing'
  elif os.path.isdir(target) and target in ancestors:
    problem = 'points back to a folder that contains it (a loop)'
  if problem:
    raise FolderDataError(
        f'config.data.folder={str(root)!r}: {path.relative_to(root)} is a symbolic link to '
        f'{os.readlink(path)} that {problem}; remove it, or copy what it should hold.')


def _files(directory: pathlib.Path, root: pathlib.Path,
           ancestors: tuple[str, ...] = ()) -> list[pathlib.Path]:
  """Every non-hidden file under `directory`, sorted (the order is the row order).

  Symbolic links are followed where they stay inside `root` and close no loop.
  """
  ancestors = ancestors + (os.path.realpath(directory),)
  files, folders = [], []
  for entry in sorted(directory.iterdir()):
    if entry.name.startswith('.'):
      continue
    if entry.is_symlink():
      _check_link(entry, root, ancestors)
    if entry.is_dir():
      folders.append(entry)
    elif entry.is_file():
      files.append(entry)
  # A folder's own files first, then its subfolders': the row order of earlier versions.
  return files + [path for folder in folders for path in _files(folder, root, ancestors)]


def _named(paths, root) -> str:
  shown = ', '.join(str(p.relative_to(root)) for p in paths[:_MAX_NAMED])
  more = len(paths) - _MAX_NAMED
  return shown + (f' and {more} more' if more > 0 else '')


def _class_folders(split_dir: pathlib.Path, root: pathlib.Path) -> dict[str, list[pathlib.Path]]:
  """{class name: its files} of every class folder of a split; empty ones are named in a warning."""
  folders = {}
  for d in sorted(split_dir.iterdir()):
    if d.name.startswith('.'):
      continue
    if d.is_symlink():
      _check_link(d, root, (str(root), os.path.realpath(split_dir)))
    if d.is_dir():
      folders[d.name] = _files(d, root, (str(root), os.path.realpath(split_dir)))
  empty = [str(split_dir.relative_to(root) / name) for name, files in folders.items() if not files]
  if empty:
    logging.warning('config.data.folder=%r: ignoring the empty class folder(s) %s (no images).',
                    str(root), ', '.join(empty))
  return {name: files for name, files in folders.items() if files}


def _eight_bit(image):
  """`image` with 8-bit pixels, or None when its pixels have no known range.

  A 16-bit grayscale image (PIL modes I;16*, and mode I from a PNG, which holds
  at most 16 bits) keeps its high byte, `value >> 8`: 65535 -> 255 and an 8-bit
  image stored as 16 bits (`v * 257`) comes back as `v`. PIL's own conversion
  clips every value above 255 instead. 32-bit integer and float images (modes I
  and F from other formats) could hold any range: None.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if image.mode in _SIXTEEN_BIT_MODES or (image.mode == 'I' and image.format == 'PNG'):
    pixels = np.asarray(image).astype(np.uint32) >> 8
    return Image.fromarray(np.minimum(pixels, 255).astype(np.uint8), mode='L')
  if image.mode in ('I', 'F'):
    return None
  return image.copy()


def _open_all(paths, root):
  """PIL images of `paths`, 8 bits per channel; one error naming every file that cannot be used."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images, bad, no_range = [], [], []
  for path in paths:
    try:
      with Image.open(path) as image:
        image.load()
        converted = _eight_bit(image)
    except Exception:  # pylint: disable=broad-except
      bad.append(path)
      continue
    if converted is None:
      no_range.append(path)
    else:
      images.append(converted)
  if bad:
    raise FolderDataError(
        f'config.data.folder={str(root)!r}: {len(bad)} file(s) are not readable images: '
        f'{_named(bad, root)}. Remove or convert them.')
  if no_range:
    raise FolderDataError(
        f'config.data.folder={str(root)!r}: {len(no_range)} image(s) hold 32-bit integer or '
        f'float pixels, whose range is unknown: {_named(no_range, root)}. Convert them to 8- or '
        '16-bit images.')
  return images


def _to_array(images, paths, root, image_size, channels):
  """uint8 [N, H, W, C]: every image converted and resized (or checked to share one size)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  mode = 'L' if channels == 1 else 'RGB'
  if not image_size:
    sizes = {}
    for image, path in zip(images, paths):
      sizes.setdefault(image.size, path)
    if len(sizes) > 1:
      shown = '; '.join(f'{w}x{h} ({p.relative_to(root)})' for (w, h), p in list(sizes.items())[:3])
      raise FolderDataError(
          f'config.data.folder={str(root)!r}: the images have {len(sizes)} different sizes '
          f'({shown}) and config.data.image_size=0; set --config.data.image_size=N to resize '
          'every image to NxN.')
  out = []
  for image in images:
    image = image.convert(mode)
    if image_size and image.size != (image_size, image_size):
      image = image.resize((image_size, image_size), Image.BILINEAR)
    array = np.asarray(image, np.uint8)
    out.append(array[..., None] if array.ndim == 2 else array)
  return np.stack(out)


def _check_fits(paths, root, image_size, max_in_memory_gb):
  """A folder too large to hold on the devices: one error before any image is decoded.

  Its size is counted as RGB at `image_size` (or at each image's stored size,
  read from the file headers only).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if image_size:
    num_bytes = len(paths) * image_size * image_size * 3
  else:
    num_bytes = 0
    for path in paths:
      try:
        with Image.open(path) as image:  # Lazy: reads the header, decodes nothing.
          num_bytes += image.size[0] * image.size[1] * 3
      except Exception:  # pylint: disable=broad-except
        pass  # Unreadable files are named by _open_all.
  if num_bytes > max_in_memory_gb * 2**30:
    raise FolderDataError(
        f'config.data.folder={str(root)!r}: its {len(paths)} training images take '
        f'{num_bytes / 2**30:.1f} GB decoded, more than config.data.max_in_memory_gb='
        f'{max_in_memory_gb:g} that is kept on every device, and a folder is not streamed. Lower '
        'config.data.image_size, raise config.data.max_in_memory_gb if the devices hold it, or '
        'write the folder as a TFDS dataset (tfds.folder_dataset.ImageFolder; `tfds build`) '
        'and name it in config.data.name: a large TFDS dataset is streamed.')


def _load(root: pathlib.Path, image_size: int, max_in_memory_gb: float) -> FolderData:
  if not root.is_dir():
    raise FolderDataError(f'config.data.folder={str(root)!r} is not a directory.')
  for split in ('train', 'test'):
    if (root / split).is_symlink():
      _check_link(root / split, root, (str(root),))
    if not (root / split).is_dir():
      raise FolderDataError(
          f'config.data.folder={str(root)!r} has no {split}/ folder; expected '
          'ROOT/train/<class>/*, ROOT/test/<class>/* and optionally ROOT/unlabeled/*.')
  train = _class_folders(root / 'train', root)
  if not train:
    raise FolderDataError(
        f'config.data.folder={str(root)!r}: {root / "train"} holds no images in class folders '
        '(expected train/<class>/<image>).')
  if len(train) < 2:
    raise FolderDataError(
        f'config.data.folder={str(root)!r}: train/ has a single class ({next(iter(train))!r}); '
        'classification needs at least two class folders.')
  names = tuple(sorted(train))
  test = _class_folders(root / 'test', root)
  if not test:
    raise FolderDataError(
        f'config.data.folder={str(root)!r}: {root / "test"} holds no images in class folders '
        '(expected test/<class>/<image>).')
  unknown = sorted(set(test) - set(names))
  empty = [name for name in unknown if (root / 'train' / name).is_dir()]
  if empty:
    raise FolderDataError(
        f'config.data.folder={str(root)!r}: train/ class folder(s) {empty} hold no images, but '
        'test/ has images of them: a class cannot be learned without training images. Add '
        'them, or remove the class from test/.')
  if unknown:
    raise FolderDataError(
        f'config.data.folder={str(root)!r}: test class(es) {unknown} have no folder in train/ '
        f'(train classes: {list(names)}).')
  loose = [p for p in (root / 'train').iterdir() if p.is_file() and not p.name.startswith('.')]
  if loose:
    raise FolderDataError(
        f'config.data.folder={str(root)!r}: train/ holds files outside class folders: '
        f'{_named(loose, root)}; put each image in train/<class>/.')
  unlabeled_dir = root / 'unlabeled'
  if unlabeled_dir.is_symlink():
    _check_link(unlabeled_dir, root, (str(root),))
  unlabeled_paths = _files(unlabeled_dir, root) if unlabeled_dir.is_dir() else []

  def listing(by_class):
    paths = [p for name in names if name in by_class for p in by_class[name]]
    labels = [i for i, name in enumerate(names) if name in by_class for _ in by_class[name]]
    return paths, np.asarray(labels, np.int64)

  train_paths, train_labels = listing(train)
  test_paths, test_labels = listing(test)
  _check_fits(train_paths + unlabeled_paths, root, image_size, max_in_memory_gb)
  all_paths = train_paths + test_paths + unlabeled_paths
  images = _open_all(all_paths, root)
  channels = 1 if all(image.mode in _GRAY_MODES for image in images) else 3
  array = _to_array(images, all_paths, root, image_size, channels)
  n_train, n_test = len(train_paths), len(test_paths)
  return FolderData(names, array[:n_train], train_labels, array[n_train:n_train + n_test],
                    test_labels, array[n_train + n_test:])


def load(data_config) -> FolderData:
  """The folder's arrays (read once per folder and size)."""
  root = pathlib.Path(os.path.expanduser(str(data_config.folder))).resolve()
  size = int(data_config.image_size)
  key = (str(root), size)
  if key not in _CACHE:
    _CACHE[key] = _load(root, size, data_config.max_in_memory_gb)
  return _CACHE[key]


def check_budget(data_config, data: FolderData):
  """A class-balanced label budget larger than a class has: one error naming the class folder."""
  if data_config.label_fraction or data_config.num_labels == -1:
    return
  per_class = data_config.num_labels // len(data.class_names)
  counts = np.bincount(data.train_labels, minlength=len(data.class_names))
  short = [(n, c) for n, c in zip(data.class_names, counts) if c < per_class]
  if short:
    shown = ', '.join(f'{n!r} has {c}' for n, c in short[:_MAX_NAMED])
    raise FolderDataError(
        f'config.data.num_labels={data_config.num_labels} asks for {per_class} labeled images '
        f'per class, but train/ class {shown}; lower config.data.num_labels or use -1 for '
        'every labeled image.')


def get_spec(data_config) -> specs.DatasetSpec:
  """Reads and checks the folder, registers its arrays as dataset 'folder', returns its spec."""
  data = load(data_config)
  check_budget(data_config, data)
  _, height, width, channels = data.train_images.shape
  num_unlabeled = len(data.unlabeled_images)
  spec = specs.DatasetSpec(
      NAME, 'train', 'test', len(data.class_names), (height, width, channels),
      mean=None, std=None,  # Computed from the labeled pool (pipeline.build_input).
      augment=data_config.augment_kind,
      pad=max(1, min(height, width) // 8), in_memory=True,
      sizes=(len(data.train_labels) + num_unlabeled, len(data.test_labels)),
      num_unlabeled=num_unlabeled)

  def arrays():
    images = np.concatenate([data.train_images, data.unlabeled_images])
    labels = np.concatenate([data.train_labels, np.full(num_unlabeled, -1, np.int64)])
    return images, labels, data.test_images, data.test_labels

  specs.register_in_memory(spec, arrays)
  return spec
