"""Tests for semimeta_jax.metrics: JSON-lines/TensorBoard writer, progress, summary."""

import importlib
import json
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from semimeta_jax import metrics


def _rows(workdir):
  lines = (workdir / metrics.METRICS_FILE).read_text().splitlines()
  return [json.loads(line) for line in lines]


def test_writer_appends_parseable_rows_and_tensorboard_events(tmp_path):
  with metrics.MetricWriter(tmp_path, enabled=True) as writer:
    writer.write_scalars(1, {'train/loss': jnp.float32(0.5), 'lr': np.float64(0.1)})
    writer.write_scalars(np.int32(2), {'eval/error_top1': 12.5, 'train/loss': jnp.nan})
    writer.flush()
  rows = _rows(tmp_path)
  assert rows == [{'step': 1, 'train/loss': 0.5, 'lr': 0.1},
                  {'step': 2, 'eval/error_top1': 12.5, 'train/loss': None}]
  assert all(type(row['step']) is int for row in rows)  # pylint: disable=unidiomatic-typecheck
  assert list(tmp_path.glob('events.out.tfevents.*'))

  # A resumed run appends to the same file.
  with metrics.MetricWriter(tmp_path, enabled=True) as writer:
    writer.write_scalars(3, {'train/loss': 0.25})
  assert [row['step'] for row in _rows(tmp_path)] == [1, 2, 3]


def test_writer_rejects_non_scalars(tmp_path):
  with metrics.MetricWriter(tmp_path, enabled=True) as writer:
    with pytest.raises(TypeError):
      writer.write_scalars(1, {'vector': np.ones(3)})


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = tmp_path / 'run'
  writer = metrics.MetricWriter(workdir, enabled=False)
  writer.write_scalars(1, {'train/loss': 0.5})
  writer.flush()
  writer.close()
  metrics.write_summary(workdir, {'error': 1.0}, enabled=False)
  assert not workdir.exists()


def test_write_summary_converts_array_values(tmp_path):
  metrics.write_summary(tmp_path, {'final_error': jnp.float32(7.75), 'steps': np.int64(400),
                                   'per_class': np.array([1.0, 2.0]), 'method': 'semimeta'})
  summary = json.loads((tmp_path / metrics.SUMMARY_FILE).read_text())
  assert summary == {'final_error': 7.75, 'steps': 400, 'per_class': [1.0, 2.0],
                     'method': 'semimeta'}


def _load_plot_curves():
  # Imported here: it loads matplotlib, which the other tests of this file do not need.
  return importlib.import_module('experiments.plot_curves')


def _fake_run(workdir, errors, *, every=100):
  """Writes a metrics.jsonl with train rows between the evaluation rows."""
  workdir.mkdir(parents=True)
  with open(workdir / metrics.METRICS_FILE, 'w') as f:
    for i, error in enumerate(errors, start=1):
      f.write(json.dumps({'step': i * every - 50, 'train/loss': 1.0}) + '\n')
      f.write(json.dumps({'step': i * every, 'eval/error_top1': error}) + '\n')


def test_plot_curves_groups_seeds_and_writes_png(tmp_path, capsys):
  plot_curves = _load_plot_curves()
  _fake_run(tmp_path / 'base_seed0', [60.0, 40.0, 30.0])
  _fake_run(tmp_path / 'base_seed1', [62.0, 44.0, 34.0])
  _fake_run(tmp_path / 'meta_seed0', [50.0, 20.0, 10.0])
  _fake_run(tmp_path / 'meta_seed1', [54.0, 24.0, 12.0, 9.0])  # Ran longer.
  out = tmp_path / 'results' / 'curves.png'
  finals = plot_curves.main([
      '--runs', f'{tmp_path}/base_seed*,{tmp_path}/meta_seed*',
      '--labels', 'Baseline,SemiMeta', '--out', str(out)])
  assert out.stat().st_size > 1000
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert list(finals) == ['Baseline', 'SemiMeta']
  assert finals['Baseline'] == {'runs': 2, 'step': 300, 'final_mean': 32.0,
                                'final_min': 30.0, 'final_max': 34.0}
  # Only the steps both seeds reached are averaged.
  assert finals['SemiMeta']['step'] == 300
  assert finals['SemiMeta']['final_mean'] == 11.0
  assert 'SemiMeta' in capsys.readouterr().out


def test_plot_curves_default_labels_and_resumed_rows(tmp_path):
  plot_curves = _load_plot_curves()
  _fake_run(tmp_path / 'semimeta_s1', [50.0, 20.0])
  _fake_run(tmp_path / 'semimeta_s2', [52.0, 22.0])
  _fake_run(tmp_path / 'supervised', [70.0, 45.0])
  # A resumed run re-evaluates step 200; the later row wins.
  with open(tmp_path / 'supervised' / metrics.METRICS_FILE, 'a') as f:
    f.write(json.dumps({'step': 200, 'eval/error_top1': 41.0}) + '\n')
  groups = plot_curves.expand_runs(f'{tmp_path}/*', None)
  counts = {label: len(dirs) for label, dirs in groups.items()}
  assert counts == {'semimeta': 2, 'supervised': 1}
  steps, errors = plot_curves.load_curve(str(tmp_path / 'supervised'))
  assert steps.tolist() == [100, 200] and errors.tolist() == [70.0, 41.0]
  assert plot_curves.default_label('runs/convlarge_digits2') == 'convlarge_digits2'
  assert plot_curves.default_label('runs/cifar10-seed=3') == 'cifar10'
  with pytest.raises(ValueError, match='labels'):
    plot_curves.expand_runs(f'{tmp_path}/*', 'A,B')
  with pytest.raises(ValueError, match='matches'):
    plot_curves.expand_runs(f'{tmp_path}/missing*', None)


def test_a_torn_last_line_is_dropped_with_a_warning_and_cut_before_appending(tmp_path, caplog, capsys):
  path = tmp_path / metrics.METRICS_FILE
  path.write_text(json.dumps({'step': 1, 'eval/error_top1': 50.0}) + '\n{"step": 2, "eval/err')
  assert metrics.read_rows(tmp_path) == [{'step': 1, 'eval/error_top1': 50.0}]
  assert f'torn last line of {path}' in caplog.text
  steps, _ = _load_plot_curves().load_curve(str(tmp_path))  # The plotting tool skips it too.
  assert steps.tolist() == [1] and f'torn last line of {path}' in capsys.readouterr().err
  with metrics.MetricWriter(tmp_path, enabled=True) as writer:
    writer.write_scalars(2, {'eval/error_top1': 40.0})
  assert [json.loads(line)['step'] for line in path.read_text().splitlines()] == [1, 2]


def test_a_damaged_line_before_the_last_is_a_clear_error(tmp_path):
  (tmp_path / metrics.METRICS_FILE).write_text('{"step": 1}\n{"st\n{"step": 3}\n')
  with pytest.raises(metrics.MetricsFileError, match='metrics.jsonl, line 2 is not a JSON row'):
    metrics.read_rows(tmp_path)


def test_without_clu_or_tensorflow_metrics_still_reach_the_json_lines(tmp_path, monkeypatch):
  # As on the GPU machines: clu (and TensorFlow, which its writers import) are absent.
  for name in ('clu', 'tensorflow'):
    monkeypatch.setitem(sys.modules, name, None)
  writer = metrics.MetricWriter(str(tmp_path), enabled=True)
  writer.write_scalars(3, {'train/loss': 0.5})
  writer.close()
  assert [json.loads(line) for line in open(tmp_path / metrics.METRICS_FILE)] == [
      {'step': 3, 'train/loss': 0.5}]
  assert not list(tmp_path.glob('events.out.tfevents*'))
