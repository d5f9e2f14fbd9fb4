"""The validation split: held out of every training pool, class-composed as documented, saved, checked."""

import json
import os

import chex
import numpy as np
import pytest

from semimeta_jax import errors
from semimeta_jax import parallel
from semimeta_jax import plan
from semimeta_jax import run_dir
from semimeta_jax import train
from semimeta_jax import validation as validation_lib
from semimeta_jax.data import pipeline
from semimeta_jax.data import splits
from semimeta_jax.data import synthetic
from semimeta_jax.data import train_pools
from semimeta_jax.data import validation_split
from tests import protocol_run
from tests.conftest import cpu_devices


def _labels(counts, seed=0):
  """Shuffled labels with `counts[c]` examples of class c."""
  labels = np.repeat(np.arange(len(counts)), counts)
  return np.random.default_rng(seed).permutation(labels)


def _draw(labels, num_classes, size, *, num_labels=0, label_fraction=0.0, seed=3):
  labeled = splits.draw_labeled_indices(labels, num_classes, num_labels=num_labels,
                                        label_fraction=label_fraction, seed=seed)
  sizes = validation_split.per_class_sizes(labels, num_classes, validation_size=size,
                                           num_labels=num_labels, label_fraction=label_fraction)
  return labeled, validation_split.draw_validation_indices(labels, labeled, sizes, seed)


def test_a_class_balanced_split_is_disjoint_from_the_labeled_one_and_balanced():
  labels = _labels([30, 25, 40, 21])
  labeled, held_out = _draw(labels, 4, 40, num_labels=8)
  assert np.intersect1d(labeled, held_out).size == 0
  assert len(np.unique(held_out)) == 40 and np.all(np.diff(held_out) > 0)
  chex.assert_trees_all_equal(np.bincount(labels[held_out], minlength=4), np.full(4, 10))
  # The labeled split is the one drawn without a validation split: holding out changes only the
  # unlabeled pool.
  chex.assert_trees_all_equal(labeled, splits.draw_labeled_indices(
      labels, 4, num_labels=8, label_fraction=0.0, seed=3))
  # Seeded: the same seed draws the same split, another seed another one.
  chex.assert_trees_all_equal(held_out, _draw(labels, 4, 40, num_labels=8)[1])
  assert not np.array_equal(held_out, _draw(labels, 4, 40, num_labels=8, seed=4)[1])


def test_a_stratified_split_takes_each_class_in_proportion_to_its_size():
  counts = np.array([50, 30, 13, 7])
  labels = _labels(counts)
  labeled, held_out = _draw(labels, 4, 17, label_fraction=0.1)
  drawn = np.bincount(labels[held_out], minlength=4)
  assert drawn.sum() == 17 and np.intersect1d(labeled, held_out).size == 0
  # Largest remainders, checked by brute force: among every composition of 17 over the classes
  # within one of the exact quotas, the drawn one is the closest in the maximum norm.
  quota = 17 * counts / counts.sum()
  floors = np.floor(quota).astype(int)
  candidates = [floors + np.array(bits) for bits in np.ndindex(2, 2, 2, 2)
                if (floors + np.array(bits)).sum() == 17]
  best = min(candidates, key=lambda c: (np.max(np.abs(c - quota)), tuple(-c)))
  chex.assert_trees_all_equal(drawn, best)


@pytest.mark.parametrize('size, message', [
    (30, 'not divisible by the 4 classes'),
    (4 * 1000, 'larger than the'),
    (4 * 14, 'class 3, which has only 13 left'),
])
def test_a_size_that_cannot_be_held_out_is_one_clear_error(size, message):
  labels = _labels([30, 25, 40, 21])
  with pytest.raises(validation_split.ValidationSizeError, match=message):
    validation_split.per_class_sizes(labels, 4, validation_size=size, num_labels=32,
                                     label_fraction=0.0)


def test_a_negative_size_is_refused_with_the_config():
  config = protocol_run.config(validation_size=-1)
  with pytest.raises(errors.ConfigError, match='config.data.validation_size=-1'):
    validation_lib.validate_config(config)


def test_the_split_is_saved_read_back_on_resume_and_an_edited_file_is_refused(tmp_path, monkeypatch):
  labels = _labels([30, 25, 40, 21])
  labeled = splits.draw_labeled_indices(labels, 4, num_labels=8, label_fraction=0.0, seed=1)
  sizes = validation_split.per_class_sizes(labels, 4, validation_size=20, num_labels=8,
                                           label_fraction=0.0)
  draw = lambda: validation_split.load_or_draw(tmp_path, labels, labeled, dataset='d', sizes=sizes,
                                               seed=1)
  first = draw()
  path = tmp_path / validation_split.VALIDATION_FILENAME
  assert json.loads(path.read_text())['indices'] == first.tolist()
  # A resumed run reads the saved split rather than drawing again.
  monkeypatch.setattr(validation_split, 'draw_validation_indices',
                      lambda *args: pytest.fail('the saved split was drawn again'))
  chex.assert_trees_all_equal(draw(), first)
  saved = json.loads(path.read_text())
  saved['indices'][0] = int(labeled[0])  # An edit: a labeled example in the validation split.
  path.write_text(json.dumps(saved))
  with pytest.raises(splits.SplitMismatchError, match='checksum'):
    draw()
  path.write_text(json.dumps({**saved, 'seed': 2}))
  with pytest.raises(splits.SplitMismatchError, match='seed: saved 2, config 1'):
    draw()


def _input(config, workdir):
  mesh = parallel.make_mesh(cpu_devices(1))
  return pipeline.build_input(config, str(workdir), mesh=mesh, process_index=0, process_count=1)


def test_the_input_holds_the_split_out_of_every_pool_and_evaluates_it_exactly(tmp_path):
  config = protocol_run.config()
  inp = _input(config, tmp_path)
  held_out = inp.validation_indices
  assert inp.num_validation_examples == protocol_run.VALIDATION_SIZE
  assert np.intersect1d(held_out, inp.labeled_indices).size == 0
  assert np.intersect1d(held_out, inp.unlabeled_indices).size == 0
  # Every other training example is still in a pool.
  chex.assert_trees_all_equal(
      np.union1d(np.union1d(held_out, inp.labeled_indices), inp.unlabeled_indices),
      np.arange(protocol_run.NUM_TRAIN))
  train_images, train_labels, test_images, _ = synthetic.make_arrays(
      protocol_run.NUM_TRAIN, protocol_run.NUM_TEST, (8, 8, 1), protocol_run.NUM_CLASSES)
  chex.assert_trees_all_equal(np.bincount(train_labels[held_out]),
                              np.full(protocol_run.NUM_CLASSES, 5))
  # The evaluated batches: exactly the held-out training rows, normalised, padding masked; no
  # test image among them.
  batches = list(inp.make_validation_batches())
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == len(held_out) and len(mask) % (config.eval_batch_size) == 0
  images = np.concatenate([b['image'] for b in batches])[mask]
  np.testing.assert_allclose(images, (train_images[held_out] / 255.0 - 0.5) / 0.25, atol=1e-6)
  chex.assert_trees_all_equal(np.concatenate([b['label'] for b in batches])[mask],
                              train_labels[held_out].astype(np.int32))
  test_rows = {row.tobytes() for row in test_images}
  assert not any(row.tobytes() in test_rows for row in train_images[held_out])
  # Resume: the same split, read back from the workdir.
  chex.assert_trees_all_equal(_input(config, tmp_path).validation_indices, held_out)


@pytest.mark.parametrize('size, message', [
    (-4, 'config.data.validation_size=-4: must be an integer >= 0'),
    (30, 'not divisible by the 4 classes'),
    (120, 'larger than the 112 training examples left'),
])
def test_a_bad_size_is_one_clear_error_before_anything_is_written(tmp_path, size, message):
  workdir = tmp_path / 'run'
  with pytest.raises(errors.ConfigError, match=message):
    train.train_and_evaluate(protocol_run.config(validation_size=size), str(workdir))
  assert not workdir.exists()


@pytest.mark.slow
def test_a_run_with_a_validation_split_logs_it_at_every_evaluation():
  config, workdir, summary = protocol_run.finished_run()
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  evaluations = [row for row in rows if 'eval_ema/error_top1' in row]
  steps = list(range(protocol_run.EVAL_EVERY, config.num_train_steps + 1, protocol_run.EVAL_EVERY))
  assert [row['step'] for row in evaluations] == steps
  for row in evaluations:
    # Both weight sets on both splits, every example counted once.
    assert row['val_ema/num_examples'] == row['val/num_examples'] == protocol_run.VALIDATION_SIZE
    assert row['eval/num_examples'] == protocol_run.NUM_TEST
    assert 0.0 <= row['val_ema/error_top1'] <= 100.0
  assert summary['num_validation_examples'] == protocol_run.VALIDATION_SIZE
  saved = json.loads((workdir / validation_split.VALIDATION_FILENAME).read_text())
  labeled = json.loads((workdir / splits.SPLIT_FILENAME).read_text())['indices']
  assert len(saved['indices']) == protocol_run.VALIDATION_SIZE
  assert not set(saved['indices']) & set(labeled)
  assert 'validation_indices.json' in os.listdir(workdir)


@pytest.mark.parametrize('includes_labeled, num_unlabeled', [(False, 0), (True, 0), (True, 10)])
def test_no_training_pool_holds_a_validation_example(includes_labeled, num_unlabeled):
  config = protocol_run.config(unlabeled_includes_labeled=includes_labeled)
  labeled, held_out = np.array([0, 5, 9]), np.array([1, 2, 7])
  pools = train_pools.pools(config, 30, labeled, True, num_unlabeled, held_out=held_out)
  for indices, _, _ in pools.values():
    assert np.intersect1d(indices, held_out).size == 0
  unlabeled = pools['unlabeled'][0]
  rows = np.arange(30 - num_unlabeled, 30) if num_unlabeled else np.setdiff1d(np.arange(30), held_out)
  expected = np.union1d(rows, labeled) if includes_labeled else np.setdiff1d(rows, labeled)
  chex.assert_trees_all_equal(unlabeled, expected)


def test_the_run_plan_counts_the_held_out_examples():
  lines = plan.run_plan(protocol_run.config(), '/nonexistent/protocol_plan').splitlines()
  left = protocol_run.NUM_TRAIN - 8 - protocol_run.VALIDATION_SIZE
  assert any(line.startswith(f'unlabeled     {left} examples') for line in lines)
  assert any(line.startswith(f'validation    {protocol_run.VALIDATION_SIZE} training examples')
             for line in lines)


def test_the_size_never_changes_in_a_workdir_and_an_earlier_run_reads_as_none(tmp_path):
  config = protocol_run.config()
  saved = json.loads(config.to_json_best_effort())
  (tmp_path / run_dir.CONFIG_FILE).write_text(json.dumps(saved))
  assert run_dir.check_config(str(tmp_path), config) == {}
  with pytest.raises(run_dir.ConfigChangedError, match='data.validation_size'):
    run_dir.check_config(str(tmp_path), protocol_run.config(validation_size=40))
  # A run recorded before the field existed held nothing out.
  del saved['data']['validation_size']
  (tmp_path / run_dir.CONFIG_FILE).write_text(json.dumps(saved))
  assert run_dir.check_config(str(tmp_path), protocol_run.config(validation_size=0)) == {}
  with pytest.raises(run_dir.ConfigChangedError, match='validation_size: saved 0, now 20'):
    run_dir.check_config(str(tmp_path), config)


@pytest.mark.slow
def test_an_interrupted_run_resumes_on_the_same_split_and_reports_over_both_parts(tmp_path):
  config, reference_dir, reference = protocol_run.finished_run()
  workdir = tmp_path / 'run'
  shorter = protocol_run.config()
  shorter.num_train_steps = 4
  first = train.train_and_evaluate(shorter, str(workdir))
  assert first['steps'] == 4
  saved = (workdir / validation_split.VALIDATION_FILENAME).read_text()
  resumed = train.train_and_evaluate(config, str(workdir))
  assert resumed['completed'] and (workdir / validation_split.VALIDATION_FILENAME).read_text() == saved
  assert saved == (reference_dir / validation_split.VALIDATION_FILENAME).read_text()
  # The same evaluations as the uninterrupted run, so the same reported figures.
  evaluations = lambda d: [{k: v for k, v in json.loads(line).items() if k.startswith(('val', 'eval'))
                            and not k.endswith('seconds')}
                           for line in (d / 'metrics.jsonl').read_text().splitlines()]
  assert evaluations(workdir) == evaluations(reference_dir)
  for key in ('final_error_top1', 'median_last_20_error_top1', 'median_last_20_count',
              'best_validation_step', 'test_error_top1_at_best_validation'):
    assert resumed[key] == reference[key], key
