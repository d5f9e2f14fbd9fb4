"""The labeled/unlabeled split of the training set, saved with the run.

The labeled examples are drawn class-balanced by a seeded shuffle, as in the
official code: walk a permutation of the training split and keep an example
while its class still needs labels. The drawn indices (into the TFDS train
split, ascending) are written to `<workdir>/labeled_indices.json` with what
produced them; a resumed run reads them back, and a config that would draw a
different split is an error rather than a silent re-draw. The saved indices are
verified on every resume: against the split drawn again from the seed where the
labels are at hand, else against the checksum saved with them, so an edited
file is refused rather than trained on.
"""

import hashlib
import json

from etils import epath
import numpy as np

from semimeta_jax import errors
from semimeta_jax import workdir_files

SPLIT_FILENAME = 'labeled_indices.json'


class SplitMismatchError(errors.UserError, ValueError):
  """The run directory's saved split does not match the configuration."""


class LabelBudgetError(errors.UserError, ValueError):
  """The configured number of labels cannot be drawn class-balanced from the dataset."""


def check_label_config(num_labels, label_fraction, num_classes):
  """Validates the label budget before any data is read.

  Args:
    num_labels: total labeled examples, class-balanced; -1 = every example.
    label_fraction: if > 0, the fraction of each class that is labeled
      (overrides `num_labels`).
    num_classes: number of classes of the dataset.

  Raises:
    LabelBudgetError: a budget that cannot be split evenly over the classes.
  """
  if label_fraction:
    if not 0.0 < label_fraction <= 1.0:
      raise LabelBudgetError(
          f'config.data.label_fraction={label_fraction} must be in (0, 1] '
          '(or 0 to use config.data.num_labels).')
    return
  if num_labels == -1:
    return
  if num_labels <= 0:
    raise LabelBudgetError(
        f'config.data.num_labels={num_labels} must be positive, or -1 for '
        'every label.')
  if num_labels % num_classes:
    raise LabelBudgetError(
        f'config.data.num_labels={num_labels} is not divisible by the '
        f'{num_classes} classes; class-balanced labels need a multiple of '
        f'{num_classes}.')


def labels_per_class(counts, num_classes, *, num_labels, label_fraction):
  """How many examples of each class the labeled split takes (a function of the class sizes only).

  Args:
    counts: int array [num_classes], the training split's examples per class.
    num_classes: number of classes.
    num_labels: see `draw_labeled_indices`.
    label_fraction: see `draw_labeled_indices`.

  Returns:
    int64 array [num_classes].

  Raises:
    LabelBudgetError: bad budget, or more labels per class than a class has.
  """
  check_label_config(num_labels, label_fraction, num_classes)
  counts = np.asarray(counts, np.int64)
  if not label_fraction and num_labels == -1:
    return counts.copy()
  if label_fraction:
    return np.minimum(np.maximum(1, np.round(label_fraction * counts)).astype(np.int64), counts)
  wanted = np.full(num_classes, num_labels // num_classes, np.int64)
  short = np.flatnonzero(wanted > counts)
  if short.size:
    raise LabelBudgetError(
        f'config.data.num_labels={num_labels} asks for {wanted[0]} labels '
        f'per class, but class {short[0]} has only {counts[short[0]]} '
        'training examples.')
  return wanted


def draw_labeled_indices(labels, num_classes, *, num_labels, label_fraction,
                         seed):
  """Draws the class-balanced labeled subset of the training split.

  Args:
    labels: int array [N], the training split's labels in TFDS order.
    num_classes: number of classes.
    num_labels: total labeled examples (a multiple of `num_classes`), or -1.
    label_fraction: if > 0, label round(fraction * class size) examples of each
      class (at least one) instead.
    seed: seed of the shuffle.

  Returns:
    Ascending int64 array of labeled indices into the training split.

  Raises:
    LabelBudgetError: bad budget, or more labels per class than a class has.
  """
  labels = np.asarray(labels, np.int64)
  counts = np.bincount(labels, minlength=num_classes)
  if not label_fraction and num_labels == -1:
    check_label_config(num_labels, label_fraction, num_classes)
    return np.arange(len(labels), dtype=np.int64)
  wanted = labels_per_class(counts, num_classes, num_labels=num_labels,
                            label_fraction=label_fraction)
  order = np.random.default_rng(seed).permutation(len(labels))
  # Rank of each example within its class along the shuffled order: an example
  # is labeled while its class still needs labels.
  shuffled = labels[order]
  by_class = np.argsort(shuffled, kind='stable')
  class_start = np.cumsum(counts) - counts
  rank = np.empty(len(labels), np.int64)
  rank[by_class] = np.arange(len(labels)) - class_start[shuffled[by_class]]
  chosen = order[rank < wanted[shuffled]]
  return np.sort(chosen)


def unlabeled_indices(num_train, labeled, includes_labeled):
  """Returns the ascending unlabeled pool: the rest of the split, or all."""
  if includes_labeled:
    return np.arange(num_train, dtype=np.int64)
  return np.setdiff1d(np.arange(num_train, dtype=np.int64), labeled)


def _record(dataset, seed, num_labels, label_fraction, num_train):
  # `num_labels` does not count when a fraction is asked for.
  num_labels = None if label_fraction else int(num_labels)
  return {'dataset': dataset, 'seed': int(seed), 'num_labels': num_labels,
          'label_fraction': float(label_fraction), 'num_train': int(num_train)}


def load_or_draw(workdir, labels, *, dataset, num_classes, num_labels,
                 label_fraction, seed, num_train=None, write=True):
  """Reads the run's saved split, or draws it and saves it.

  Args:
    workdir: run directory (local or any `etils.epath` path); None = do not
      save or restore.
    labels: int array [N] of the training split's labels, or a function
      returning it, called only when the split has to be drawn (reading the
      labels of a large dataset is a pass over it).
    dataset: canonical dataset name, recorded and checked.
    num_classes: number of classes.
    num_labels: see `draw_labeled_indices`.
    label_fraction: see `draw_labeled_indices`.
    seed: seed of the shuffle.
    num_train: size of the training split; required when `labels` is a
      function.
    write: whether this process writes the file (process 0 does; the others
      draw the same split from the same seed).

  Returns:
    Ascending int64 array of labeled indices.

  Raises:
    SplitMismatchError: the saved split was drawn with other settings.
  """
  if num_train is None:
    num_train = len(labels)
  record = _record(dataset, seed, num_labels, label_fraction, num_train)
  path = epath.Path(workdir) / SPLIT_FILENAME if workdir else None
  if path and path.exists():
    saved = workdir_files.read_json_object(
        path, fix='restore it, or use a new --workdir (the split is part of what the run is)')
    diffs = [f'{k}: saved {saved.get(k)!r}, config {v!r}'
             for k, v in record.items() if saved.get(k) != v]
    if diffs:
      raise SplitMismatchError(
          f'{path} holds a labeled split drawn with other settings ('
          + '; '.join(diffs) + '). Use a new workdir, or restore the settings '
          'the run started with.')
    return _verified(path, saved, labels, num_classes=num_classes, num_labels=num_labels,
                     label_fraction=label_fraction, seed=seed, num_train=num_train)
  if callable(labels):
    labels = labels()
  if len(labels) != num_train:
    raise ValueError(f'Got {len(labels)} labels for {num_train} examples.')
  indices = draw_labeled_indices(
      labels, num_classes, num_labels=num_labels,
      label_fraction=label_fraction, seed=seed)
  if path and write:
    workdir_files.make_dirs(path.parent)
    # Readers on other processes never see a half-written file.
    workdir_files.write_atomically(path, json.dumps(
        {**record, 'sha256': _checksum(indices), 'indices': indices.tolist()}))
  return indices


def _checksum(indices) -> str:
  return hashlib.sha256(np.asarray(indices, '<i8').tobytes()).hexdigest()


def _verified(path, saved, labels, *, num_classes, num_labels, label_fraction, seed, num_train):
  """The saved indices, once they are shown to be the split the seed draws.

  With the labels at hand (an array) the split is drawn again and compared;
  otherwise (a function: drawing would be a pass over the dataset) the
  checksum saved with the indices is compared, and only a file without one is
  checked by drawing again.
  """
  refuse = lambda why: SplitMismatchError(
      f'{path} is not the labeled split this run drew ({why}): it was edited or damaged. Restore '
      'it (or delete it: the same seed draws the same split again), or use a new --workdir.')
  try:
    indices = np.asarray(saved['indices'], np.int64)
  except (KeyError, TypeError, ValueError) as e:
    raise refuse(f'no list of integer indices: {type(e).__name__}') from e
  if indices.ndim != 1 or (indices.size and (indices.min() < 0 or indices.max() >= num_train)):
    raise refuse('indices outside the train split')
  if callable(labels) and 'sha256' in saved:
    if saved['sha256'] != _checksum(indices):
      raise refuse('its indices do not match the checksum saved with them')
    return indices
  if callable(labels):
    labels = labels()
  drawn = draw_labeled_indices(labels, num_classes, num_labels=num_labels,
                               label_fraction=label_fraction, seed=seed)
  if not np.array_equal(drawn, indices):
    differ = len(np.setxor1d(drawn, indices))
    raise refuse(f'{differ} index(es) differ from the {len(drawn)} drawn from seed {seed}' if differ
                 else 'the indices are out of their ascending order')
  return indices


def even_bounds(n, count):
  """Boundaries of `count` contiguous shares of `range(n)`, sizes within 1.

  Share `p` is `range(bounds[p], bounds[p + 1])`; the first `n % count` shares
  get one extra element (as `tfds.even_splits`).
  """
  sizes = np.full(count, n // count, np.int64)
  sizes[:n % count] += 1
  return np.concatenate([[0], np.cumsum(sizes)])
