"""The validation split: examples held out of the training pool, saved with the run.

The protocol of Oliver et al. (2018, "Realistic evaluation of deep
semi-supervised learning algorithms"): the validation examples come from the
labeled training data's source split, and are disjoint from the labeled pool,
the unlabeled pool and the test set. They are drawn after the labeled split,
from the examples it left (never from a truly unlabeled pool, which has no
labels), so a run with a validation split trains on the same labeled examples
as the run without one; only the unlabeled pool loses the held-out examples.

Class composition follows the labeled split's: with `data.num_labels` (a
class-balanced labeled split) each class gives `validation_size / num_classes`
examples, so the size must be a multiple of the class count; with
`data.label_fraction` (a stratified labeled split) each class gives its share of
the training split (largest remainders, so the total is exact). The draw is a
seeded shuffle of its own stream of `config.seed`, independent of the labeled
split's and of the training streams.

The drawn indices (into the labeled rows of the train split, ascending) are
written to `<workdir>/validation_indices.json` with what produced them. A
resumed run reads them back and uses them as saved, after checking that they
still are a split of this run: the checksum saved with them, the per-class
counts, and disjointness from the labeled split; an edited file is refused.
"""

import hashlib
import json

from etils import epath
import numpy as np

from semimeta_jax import errors
from semimeta_jax import workdir_files
from semimeta_jax.data import splits

VALIDATION_FILENAME = 'validation_indices.json'
# Mixed into the seed so that the draw is independent of the labeled split's shuffle (the bare
# seed) and of the training streams (`train_pools.stream_seeds`, stream ids 0 and 1).
_STREAM_TAG = 0x76616C  # 'val'


class ValidationSizeError(errors.ConfigError):
  """`config.data.validation_size` cannot be held out of this dataset's training pool."""


def per_class_sizes(labels, num_classes, *, validation_size, num_labels, label_fraction):
  """The validation examples each class gives, checked against what the labeled split leaves.

  A function of the class sizes only, so it is checked before anything is drawn or written.

  Args:
    labels: int array [N], the labeled rows' labels.
    num_classes: number of classes.
    validation_size: `config.data.validation_size` (> 0).
    num_labels: `config.data.num_labels`.
    label_fraction: `config.data.label_fraction`.

  Returns:
    int64 array [num_classes] summing to `validation_size`.

  Raises:
    ValidationSizeError: a size that cannot be held out (not a multiple of the classes for a
      class-balanced split, or more than a class has left after its labels).
    splits.LabelBudgetError: the label budget itself does not fit.
  """
  counts = np.bincount(np.asarray(labels, np.int64), minlength=num_classes)
  left = counts - splits.labels_per_class(counts, num_classes, num_labels=num_labels,
                                          label_fraction=label_fraction)
  field = f'config.data.validation_size={validation_size}'
  if validation_size > left.sum():
    raise ValidationSizeError(
        f'{field} is larger than the {left.sum()} training examples left after the labeled '
        f'split ({counts.sum()} examples, {counts.sum() - left.sum()} labeled); hold out at most '
        f'{left.sum()}.')
  if label_fraction:
    quota = validation_size * counts / counts.sum()
    sizes = np.floor(quota).astype(np.int64)
    # Largest remainders first (lower class first on ties): the sizes sum to validation_size.
    extra = np.argsort(-(quota - sizes), kind='stable')[:validation_size - sizes.sum()]
    sizes[extra] += 1
  else:
    if validation_size % num_classes:
      raise ValidationSizeError(
          f'{field} is not divisible by the {num_classes} classes: the labeled split is '
          f'class-balanced, so the validation split is too; use a multiple of {num_classes}.')
    sizes = np.full(num_classes, validation_size // num_classes, np.int64)
  short = np.flatnonzero(sizes > left)
  if short.size:
    c = short[0]
    raise ValidationSizeError(
        f'{field} asks for {sizes[c]} examples of class {c}, which has only {left[c]} left '
        f'after its {counts[c] - left[c]} labeled ones; hold out fewer.')
  return sizes


def draw_validation_indices(labels, labeled, sizes, seed):
  """Draws `sizes[c]` examples of each class c among the rows that are not labeled.

  Walks a seeded permutation of the rows and keeps an unlabeled example while its
  class still needs validation examples (as the labeled split is drawn).

  Args:
    labels: int array [N], the labeled rows' labels.
    labeled: the labeled split (indices into the rows).
    sizes: per-class sizes (`per_class_sizes`).
    seed: the run's seed.

  Returns:
    Ascending int64 array of validation indices, disjoint from `labeled`.
  """
  labels = np.asarray(labels, np.int64)
  rng = np.random.default_rng(np.random.SeedSequence([seed % 2**32, _STREAM_TAG]))
  order = rng.permutation(len(labels))
  is_labeled = np.zeros(len(labels), bool)
  is_labeled[np.asarray(labeled, np.int64)] = True
  candidates = order[~is_labeled[order]]
  shuffled = labels[candidates]
  # Rank of each candidate within its class along the shuffled order.
  by_class = np.argsort(shuffled, kind='stable')
  counts = np.bincount(shuffled, minlength=len(sizes))
  class_start = np.cumsum(counts) - counts
  rank = np.empty(len(candidates), np.int64)
  rank[by_class] = np.arange(len(candidates)) - class_start[shuffled[by_class]]
  return np.sort(candidates[rank < np.asarray(sizes)[shuffled]])


def _checksum(indices) -> str:
  return hashlib.sha256(np.asarray(indices, '<i8').tobytes()).hexdigest()


def _record(dataset, seed, sizes, num_rows, labeled):
  return {'dataset': dataset, 'seed': int(seed), 'validation_size': int(np.sum(sizes)),
          'per_class': [int(s) for s in sizes], 'num_rows': int(num_rows),
          'labeled_sha256': _checksum(labeled)}


def load_or_draw(workdir, labels, labeled, *, dataset, sizes, seed, write=True):
  """Reads the run's saved validation split, or draws it and saves it.

  Args:
    workdir: run directory, or None (nothing read or saved).
    labels: int array [N], the labeled rows' labels (not a truly unlabeled pool's).
    labeled: the run's labeled split (indices into the same rows).
    dataset: canonical dataset name, recorded and checked.
    sizes: per-class sizes (`per_class_sizes`).
    seed: the run's seed.
    write: whether this process writes the file (process 0).

  Returns:
    Ascending int64 array of validation indices.

  Raises:
    splits.SplitMismatchError: the saved split was drawn with other settings, or edited.
  """
  labels = np.asarray(labels, np.int64)
  record = _record(dataset, seed, sizes, len(labels), labeled)
  path = epath.Path(workdir) / VALIDATION_FILENAME if workdir else None
  if path and path.exists():
    saved = workdir_files.read_json_object(
        path, fix='restore it, or use a new --workdir (the split is part of what the run is)')
    diffs = [f'{k}: saved {saved.get(k)!r}, config {v!r}' for k, v in record.items()
             if saved.get(k) != v]
    if diffs:
      raise splits.SplitMismatchError(
          f'{path} holds a validation split drawn with other settings (' + '; '.join(diffs)
          + '). Use a new workdir, or restore the settings the run started with.')
    return _verified(path, saved, labels, labeled, sizes)
  indices = draw_validation_indices(labels, labeled, sizes, seed)
  if path and write:
    workdir_files.make_dirs(path.parent)
    workdir_files.write_atomically(path, json.dumps(
        {**record, 'sha256': _checksum(indices), 'indices': indices.tolist()}))
  return indices


def _verified(path, saved, labels, labeled, sizes):
  """The saved indices, once they are shown to be a validation split of this run."""
  refuse = lambda why: splits.SplitMismatchError(
      f'{path} is not the validation split this run drew ({why}): it was edited or damaged. '
      'Restore it (or delete it: the same seed draws the same split again), or use a new --workdir.')
  try:
    indices = np.asarray(saved['indices'], np.int64)
  except (KeyError, TypeError, ValueError) as e:
    raise refuse(f'no list of integer indices: {type(e).__name__}') from e
  if saved.get('sha256') != _checksum(indices):
    raise refuse('its indices do not match the checksum saved with them')
  if indices.ndim != 1 or (indices.size and (indices.min() < 0 or indices.max() >= len(labels))):
    raise refuse('indices outside the training rows')
  if np.any(np.diff(indices) <= 0):
    raise refuse('indices not ascending and distinct')
  if np.intersect1d(indices, labeled).size:
    raise refuse('it shares examples with the labeled split')
  if not np.array_equal(np.bincount(labels[indices], minlength=len(sizes)), sizes):
    raise refuse('its class counts are not the configured ones')
  return indices
