"""The normalisation statistics of a dataset that registers none (a folder, a TFDS name).

They are the labeled pool's per-channel mean and standard deviation, computed
when a run starts and saved in its workdir, so a resumed run normalises as the
run started even if the data on disk changed. Shared by both input paths.
"""

import dataclasses
import json
import math

from etils import epath
import numpy as np

from semimeta_jax import workdir_files

NORMALIZATION_FILENAME = 'normalization.json'
_CHUNK = 1024


_FIX = "delete it (the labeled pool's are computed again) or restore it"


def _read_saved(path, channels: int) -> tuple[list[float], list[float]]:
  """The saved (mean, std), each `channels` finite numbers, the stds > 0.

  Raises:
    WorkdirFileError: naming the file and the first unusable value; a NaN mean
      or a zero std would otherwise train on NaN inputs (or divide by zero).
  """
  saved = workdir_files.read_json_object(path)
  mean, std = saved.get('mean'), saved.get('std')
  if not (isinstance(mean, list) and isinstance(std, list)):
    raise workdir_files.WorkdirFileError(f'{path} has no per-channel mean and std lists; {_FIX}.')
  for name, values in (('mean', mean), ('std', std)):
    if len(values) != channels:
      raise workdir_files.WorkdirFileError(
          f'{path}: "{name}" has {len(values)} value(s) {values!r}, but the images have '
          f'{channels} channel(s); {_FIX}.')
    for value in values:
      number = isinstance(value, (int, float)) and not isinstance(value, bool)
      if not number or not math.isfinite(value) or (name == 'std' and value <= 0):
        expected = 'a number > 0' if name == 'std' else 'a finite number'
        raise workdir_files.WorkdirFileError(
            f'{path}: "{name}" holds {value!r}, not {expected}; {_FIX}.')
  return mean, std


def with_statistics(workdir, spec, images, labeled, write):
  """The spec with its mean/std: registered ones, or the labeled pool's (saved in the workdir).

  A resumed run reads `<workdir>/normalization.json` back.

  Args:
    workdir: the run directory, or None (nothing read or saved).
    spec: the `DatasetSpec`; kept as is when it has a mean and std.
    images: uint8 [N, H, W, C] rows the labeled indices point into.
    labeled: indices into `images` of the labeled pool.
    write: whether this process saves the statistics (process 0).

  Returns:
    The `DatasetSpec` with `mean` and `std` set.
  """
  if spec.mean is not None and spec.std is not None:
    return spec
  path = epath.Path(workdir) / NORMALIZATION_FILENAME if workdir else None
  if path and path.exists():
    mean, std = _read_saved(path, channels=spec.image_shape[-1])
  else:
    # Per-channel sums in chunks: a large labeled pool never exists whole in float64.
    total, total_sq, count = 0.0, 0.0, 0
    for start in range(0, len(labeled), _CHUNK):
      pixels = np.asarray(images[labeled[start:start + _CHUNK]], np.float64) / 255.0
      total = total + pixels.sum(axis=(0, 1, 2))
      total_sq = total_sq + np.square(pixels).sum(axis=(0, 1, 2))
      count += pixels[..., 0].size
    mean = total / count
    # A constant channel would divide by zero.
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    mean, std = mean.tolist(), np.maximum(std, 1e-3).tolist()
    if path and write:
      workdir_files.make_dirs(path.parent)
      workdir_files.write_atomically(path, json.dumps(
          {'dataset': spec.name, 'source': 'labeled pool', 'mean': mean, 'std': std}))
  return dataclasses.replace(spec, mean=tuple(float(m) for m in mean),
                             std=tuple(float(s) for s in std))
