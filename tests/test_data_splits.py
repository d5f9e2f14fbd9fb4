"""Tests of the labeled split: balance, determinism, saving and restoring."""

import json

import numpy as np
import pytest

from semimeta_jax.data import splits


def _labels(num_classes=10, per_class=(50, 60, 70), seed=0):
  counts = np.resize(per_class, num_classes)
  labels = np.repeat(np.arange(num_classes), counts)
  return np.random.default_rng(seed).permutation(labels)


def _draw(labels, num_labels=100, label_fraction=0.0, seed=0):
  return splits.draw_labeled_indices(
      labels, 10, num_labels=num_labels, label_fraction=label_fraction,
      seed=seed)


def test_class_balanced_sorted_unique():
  labels = _labels()
  labeled = _draw(labels, num_labels=200)
  assert len(labeled) == 200
  np.testing.assert_array_equal(labeled, np.unique(labeled))
  np.testing.assert_array_equal(np.bincount(labels[labeled], minlength=10),
                                np.full(10, 20))


def test_same_seed_same_split_other_seed_other_split():
  labels = _labels()
  np.testing.assert_array_equal(_draw(labels, seed=3), _draw(labels, seed=3))
  assert not np.array_equal(_draw(labels, seed=3), _draw(labels, seed=4))


def test_unlabeled_pool_is_the_rest_or_everything():
  labels = _labels()
  labeled = _draw(labels)
  rest = splits.unlabeled_indices(len(labels), labeled, includes_labeled=False)
  assert not np.intersect1d(rest, labeled).size
  np.testing.assert_array_equal(np.sort(np.concatenate([rest, labeled])),
                                np.arange(len(labels)))
  everything = splits.unlabeled_indices(len(labels), labeled, True)
  np.testing.assert_array_equal(everything, np.arange(len(labels)))


def test_label_fraction_is_per_class():
  labels = _labels(per_class=(50, 60, 70))
  labeled = _draw(labels, num_labels=-1, label_fraction=0.1)
  counts = np.bincount(labels, minlength=10)
  np.testing.assert_array_equal(np.bincount(labels[labeled], minlength=10),
                                np.round(0.1 * counts))


def test_all_labels():
  labels = _labels()
  np.testing.assert_array_equal(_draw(labels, num_labels=-1),
                                np.arange(len(labels)))


@pytest.mark.parametrize('num_labels,fraction,match', [
    (105, 0.0, 'not divisible by the 10 classes'),
    (0, 0.0, 'must be positive'),
    (4000, 1.5, r'label_fraction=1.5 must be in \(0, 1\]'),
])
def test_bad_budget_is_rejected_early(num_labels, fraction, match):
  with pytest.raises(ValueError, match=match):
    splits.check_label_config(num_labels, fraction, 10)


def test_more_labels_per_class_than_a_class_has():
  with pytest.raises(ValueError, match='class 0 has only 50'):
    _draw(_labels(per_class=(50, 60, 70)), num_labels=1000)


def test_saved_then_restored(tmp_path):
  labels = _labels()
  kwargs = dict(dataset='toy', num_classes=10, num_labels=100,
                label_fraction=0.0, seed=1)
  first = splits.load_or_draw(str(tmp_path), labels, **kwargs)
  saved = json.loads((tmp_path / splits.SPLIT_FILENAME).read_text())
  assert saved['dataset'] == 'toy' and saved['seed'] == 1
  assert saved['num_labels'] == 100
  np.testing.assert_array_equal(saved['indices'], first)

  def must_not_redraw():
    raise AssertionError('a saved split must be read, not drawn again')

  again = splits.load_or_draw(str(tmp_path), must_not_redraw,
                              num_train=len(labels), **kwargs)
  np.testing.assert_array_equal(again, first)


@pytest.mark.parametrize('change', [
    {'seed': 2}, {'num_labels': 200}, {'dataset': 'other'},
    {'label_fraction': 0.1}])
def test_mismatch_with_saved_split_is_an_error(tmp_path, change):
  labels = _labels()
  kwargs = dict(dataset='toy', num_classes=10, num_labels=100,
                label_fraction=0.0, seed=1)
  splits.load_or_draw(str(tmp_path), labels, **kwargs)
  with pytest.raises(splits.SplitMismatchError, match=next(iter(change))):
    splits.load_or_draw(str(tmp_path), labels, **{**kwargs, **change})


def test_only_the_writing_process_writes(tmp_path):
  splits.load_or_draw(str(tmp_path), _labels(), dataset='toy', num_classes=10,
                      num_labels=100, label_fraction=0.0, seed=1, write=False)
  assert not (tmp_path / splits.SPLIT_FILENAME).exists()


@pytest.mark.parametrize('n,count', [(10, 3), (7, 7), (2, 4), (300, 2)])
def test_even_bounds_partition(n, count):
  bounds = splits.even_bounds(n, count)
  sizes = np.diff(bounds)
  assert bounds[0] == 0 and bounds[-1] == n and len(sizes) == count
  assert sizes.max() - sizes.min() <= 1 and np.all(sizes >= 0)
