"""The feature-embedding figure: a finished run's reported weights over its test split, t-SNE, PNG."""

import json
import shutil

import chex
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import feature_embedding
from semimeta_jax import checkpoint
from semimeta_jax import methods
from semimeta_jax import models
from semimeta_jax import parallel
from semimeta_jax import run_dir
from semimeta_jax import train
from tests.conftest import tiny_config
from tests.test_train import mock_config
from tests.test_train import run

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
NUM_TEST = 40  # tfds.testing.mock_data(num_examples=40) in `run`.
# Mean Teacher + fast-SWA: the run reports the average (with recomputed batch statistics), not
# the raw weights nor the EMA teacher, so reading the wrong set would show.
MT_FAST_SWA = {
    'method': 'mean_teacher', 'ema.decay': 0.9, 'num_train_steps': 8, 'eval_every_steps': 4,
    'checkpoint_every_steps': 4, 'fast_swa.cycles': 1, 'fast_swa.cycle_steps': 4,
    'fast_swa.average_every_steps': 2, 'fast_swa.lr_max': 0.05, 'fast_swa.lr_min': 0.005,
    'fast_swa.bn_update_batches': 2}


def _finished_run_files(workdir, *, completed=True, num_eval_examples=300):
  """A run directory's records only (no checkpoint): enough for the argument checks."""
  workdir.mkdir(parents=True)
  config = tiny_config()
  (workdir / 'config.json').write_text(config.to_json_best_effort())
  (workdir / 'summary.json').write_text(json.dumps({
      'steps': 10, 'completed': completed, 'final_error_top1': 12.5 if completed else None,
      'num_eval_examples': num_eval_examples}))
  return str(workdir)


def test_the_saved_config_is_rebuilt_field_for_field(tmp_path):
  config = tiny_config(**{'method': 'mean_teacher', 'ema.decay': 0.9, 'ema.headline': True,
                          'lr_decay_boundaries': (5, 7), 'data.data_dir': '/somewhere'})
  run_dir.record_config(str(tmp_path), config, 0)
  rebuilt = feature_embedding.saved_config(str(tmp_path))
  assert rebuilt.to_json_best_effort(sort_keys=True) == config.to_json_best_effort(sort_keys=True)
  assert methods.configure(rebuilt).headline == 'eval_ema'
  moved = feature_embedding.saved_config(str(tmp_path), data_dir='/elsewhere')
  assert moved.data.data_dir == '/elsewhere' and moved.ema.decay == 0.9


def test_a_saved_field_this_version_lacks_is_refused(tmp_path):
  saved = json.loads(tiny_config().to_json_best_effort())
  saved['retired_field'] = 1
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  with pytest.raises(feature_embedding.RunDirectoryError, match='retired_field'):
    feature_embedding.saved_config(str(tmp_path))


def test_bad_arguments_are_refused_before_anything_is_computed(tmp_path):
  good = _finished_run_files(tmp_path / 'good')
  check = feature_embedding.check_arguments
  with pytest.raises(feature_embedding.RunDirectoryError, match='2 --labels for 1 --runs'):
    check([good], ['a', 'b'], str(tmp_path / 'f.png'), 30)
  with pytest.raises(feature_embedding.RunDirectoryError, match='ending in .png'):
    check([good], ['a'], str(tmp_path / 'f.pdf'), 30)
  with pytest.raises(feature_embedding.RunDirectoryError, match='has no summary.json'):
    check([str(tmp_path / 'absent')], ['a'], str(tmp_path / 'f.png'), 30)
  unfinished = _finished_run_files(tmp_path / 'unfinished', completed=False)
  with pytest.raises(feature_embedding.RunDirectoryError, match='unfinished run'):
    check([good, unfinished], ['a', 'b'], str(tmp_path / 'f.png'), 30)
  small = _finished_run_files(tmp_path / 'small', num_eval_examples=30)
  with pytest.raises(feature_embedding.RunDirectoryError, match='more than --perplexity=30'):
    check([small], ['a'], str(tmp_path / 'f.png'), 30)
  assert check([good], ['a'], str(tmp_path / 'f.png'), 30)[0]['final_error_top1'] == 12.5
  assert not (tmp_path / 'f.png').exists()


def test_many_classes_are_drawn_without_a_legend(tmp_path):
  rng = np.random.default_rng(0)
  out = tmp_path / 'many.png'
  feature_embedding.plot_embeddings(
      [('a', rng.normal(size=(60, 2)), rng.integers(0, 100, 60), 100)], str(out))
  assert out.read_bytes().startswith(PNG_MAGIC)


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp('features')
  config = mock_config(tmp_path, **MT_FAST_SWA)
  summary = run(config, tmp_path / 'run')
  return config, tmp_path / 'run', summary


def _reported_head(config, workdir, prefix):
  """(kernel, bias) of the classifier of the weight set `prefix`, restored independently."""
  target = train.create_train_state(config, models.get_model(config, 10), (32, 32, 3),
                                    parallel.make_mesh(), num_train=NUM_TEST, num_classes=10)
  with checkpoint.Checkpointer(str(workdir), keep=3, read_only=True) as checkpointer:
    state = checkpointer.restore(target)
  select = next(ws.select for ws in methods.configure(config).weight_sets() if ws.prefix == prefix)
  params, _ = select(state)
  fc = params['head']['fc']
  return np.asarray(fc['kernel'], np.float64), np.asarray(fc['bias'], np.float64)


@pytest.mark.slow
def test_the_figure_of_a_finished_run_reads_its_reported_weights(finished_run, tmp_path):
  config, workdir, summary = finished_run
  out = tmp_path / 'figure' / 'features.png'
  with tfds.testing.mock_data(num_examples=NUM_TEST):
    (result,) = feature_embedding.main([f'--runs={workdir}', '--labels=MT+fast-SWA', f'--out={out}'])
    test_labels = np.array([ex['label'] for ex in tfds.as_numpy(tfds.load('cifar10', split='test'))])
  assert result.prefix == summary['reported_prefix'] == 'eval_swa'
  assert result.step == summary['steps'] == 8
  # Every test example once, in split order, one row of the model's pooled width each.
  np.testing.assert_array_equal(result.labels, test_labels)
  kernel, bias = _reported_head(config, workdir, result.prefix)
  chex.assert_shape(result.features, (NUM_TEST, kernel.shape[0]))
  # The features are the head's input of the forward that gave the logits (head = pool, then fc).
  np.testing.assert_allclose(result.features.astype(np.float64) @ kernel + bias, result.logits,
                             rtol=1e-4, atol=1e-4)
  wrong = np.mean(np.argmax(result.logits, axis=1) != test_labels)
  assert result.error == pytest.approx(wrong, abs=1e-12)
  assert abs(result.error - summary['final_error_top1'] / 100) <= 1e-6
  embedding = feature_embedding.embed(result.features)
  chex.assert_shape(embedding, (NUM_TEST, 2))
  assert np.all(np.isfinite(embedding))
  assert out.stat().st_size > 0 and out.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.slow
def test_a_summary_that_the_weights_do_not_reproduce_is_refused(finished_run, tmp_path):
  _, workdir, summary = finished_run
  copy = tmp_path / 'copy'
  shutil.copytree(workdir, copy)
  # One test example more wrong than the run measured.
  summary = {**summary, 'final_error_top1': summary['final_error_top1'] + 100 / NUM_TEST}
  if summary['final_error_top1'] > 100:
    summary['final_error_top1'] -= 2 * 100 / NUM_TEST
  (copy / 'summary.json').write_text(json.dumps(summary))
  with tfds.testing.mock_data(num_examples=NUM_TEST):
    with pytest.raises(feature_embedding.WeightsMismatchError, match='eval_swa weights of step 8'):
      feature_embedding.extract_features(str(copy))
