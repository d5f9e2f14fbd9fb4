"""The reported result: final, median of the last 20 evaluations, test error at the best validation step."""

import contextlib
import io
import json

import numpy as np
import pytest

from experiments import digits_results
from semimeta_jax import cli
from semimeta_jax import result_protocol
from tests import protocol_run


def _reference(rows, test_key, val_key):
  """NumPy, from the rows as written: (median of the last <= 20 test errors, count, (step, val, test)
  at the lowest validation error, first on ties)."""
  evaluations = [r for r in rows if r.get(test_key) is not None]
  steps = np.array([r['step'] for r in evaluations])
  tests = np.array([r[test_key] for r in evaluations], np.float64)[np.argsort(steps, kind='stable')]
  median = np.median(tests[-20:]) if len(tests) else None
  both = [r for r in evaluations if r.get(val_key) is not None]
  if not both:
    return median, min(len(tests), 20), None
  vals = np.array([r[val_key] for r in both], np.float64)
  # The lowest validation error, then the earliest step.
  first = np.lexsort((np.array([r['step'] for r in both]), vals))[0]
  return median, min(len(tests), 20), (both[first]['step'], vals[first], both[first][test_key])


def _rows(num_evaluations, seed, *, with_validation=True, prefix='eval'):
  """metrics.jsonl-like rows: training rows between evaluations, errors on a coarse grid (ties)."""
  rng = np.random.default_rng(seed)
  rows = []
  for k in range(1, num_evaluations + 1):
    rows.append({'step': 10 * k - 5, 'train/loss': float(rng.random())})
    row = {'step': 10 * k, f'{prefix}/error_top1': float(rng.integers(0, 40)),
           'eval_other/error_top1': float(rng.integers(0, 40))}
    if with_validation:
      row[f'{result_protocol.validation_prefix(prefix)}/error_top1'] = float(rng.integers(0, 8))
    rows.append(row)
  return rows


@pytest.mark.parametrize('num_evaluations', [1, 7, 20, 33])
@pytest.mark.parametrize('prefix', ['eval', 'eval_ema'])
def test_the_figures_equal_numpy_on_the_rows(num_evaluations, prefix):
  rows = _rows(num_evaluations, seed=num_evaluations, prefix=prefix)
  val_prefix = result_protocol.validation_prefix(prefix)
  assert val_prefix == {'eval': 'val', 'eval_ema': 'val_ema'}[prefix]
  median, count, (step, val, test) = _reference(rows, f'{prefix}/error_top1', f'{val_prefix}/error_top1')
  got = result_protocol.summarize(rows, prefix)
  assert got['median_last_20_count'] == count == min(num_evaluations, 20)
  np.testing.assert_allclose(got['median_last_20_error_top1'], median)
  assert (got['best_validation_step'], got['best_validation_error_top1'],
          got['test_error_top1_at_best_validation']) == (step, val, test)


def test_without_a_validation_split_no_figure_is_chosen():
  rows = _rows(25, seed=1, with_validation=False)
  got = result_protocol.summarize(rows, 'eval')
  assert got['best_validation_step'] is None and got['test_error_top1_at_best_validation'] is None
  np.testing.assert_allclose(got['median_last_20_error_top1'],
                             np.median([r['eval/error_top1'] for r in rows if 'eval/error_top1' in r][-20:]))
  assert result_protocol.summarize([], 'eval')['median_last_20_count'] == 0


def test_a_step_logged_twice_counts_once_with_its_last_row():
  rows = [{'step': 10, 'eval/error_top1': 50.0, 'val/error_top1': 1.0},
          {'step': 20, 'eval/error_top1': 30.0, 'val/error_top1': 5.0},
          {'step': 10, 'eval/error_top1': 40.0, 'val/error_top1': 9.0}]
  got = result_protocol.summarize(rows, 'eval')
  assert got['median_last_20_count'] == 2 and got['median_last_20_error_top1'] == 35.0
  assert got['best_validation_step'] == 20 and got['test_error_top1_at_best_validation'] == 30.0


@pytest.mark.slow
def test_a_runs_summary_equals_numpy_on_its_metrics_and_selects_nothing_on_test():
  _, workdir, summary = protocol_run.finished_run()
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  median, count, (step, val, test) = _reference(rows, 'eval_ema/error_top1', 'val_ema/error_top1')
  assert summary['reported_prefix'] == 'eval_ema'
  assert summary['median_last_20_count'] == count == protocol_run.NUM_STEPS // protocol_run.EVAL_EVERY
  np.testing.assert_allclose(summary['median_last_20_error_top1'], median)
  assert summary['best_validation_step'] == step
  np.testing.assert_allclose(summary['best_validation_error_top1'], val)
  np.testing.assert_allclose(summary['test_error_top1_at_best_validation'], test)
  last = max((r for r in rows if 'eval_ema/error_top1' in r), key=lambda r: r['step'])
  assert summary['final_error_top1'] == last['eval_ema/error_top1']
  # No figure picks a step on the test set: every 'best' is the validation's.
  assert not [key for key in summary if 'best' in key and 'validation' not in key]
  # What a user reads at the end of the run states the same figures.
  lines = _outcome(summary, workdir)
  assert f'median of the last {count} evaluations {median:.2f}%' in lines
  assert f'best validation step ({step}, validation error {val:.2f}%' in lines
  assert 'best ' not in lines.replace('best validation', '')


def _outcome(summary, workdir):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    cli.print_outcome(summary, str(workdir))
  return out.getvalue()


def test_an_old_summary_is_read_with_the_figures_computed_from_its_metrics(tmp_path):
  rows = _rows(24, seed=5, with_validation=False)
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  old = {'completed': True, 'final_error_top1': 10.0, 'best_error_top1': 3.0, 'num_labeled': 50,
         'wall_seconds_this_run': 1.0}
  config = digits_results.resolve_config(digits_results.VARIANTS['labeled_only'])
  read = digits_results.with_protocol(old, tmp_path, config)
  median, count, _ = _reference(rows, 'eval/error_top1', 'val/error_top1')
  assert read['median_last_20_count'] == count == 20 and read['reported_prefix'] == 'eval'
  np.testing.assert_allclose(read['median_last_20_error_top1'], median)
  assert read['best_error_top1'] == 3.0  # Old keys are kept, but no table reads them.
  row = digits_results.summary_row('labeled_only', 0, read)
  assert 'best_error_top1' not in row


def test_the_table_states_its_protocol_and_the_validation_column():
  summaries = [{'final_error_top1': e, 'median_last_20_error_top1': m, 'median_last_20_count': 20,
                'test_error_top1_at_best_validation': v, 'num_labeled': 30,
                'num_validation_examples': 50, 'wall_seconds_this_run': 60.0}
               for e, m, v in ((10.0, 12.0, 11.0), (12.0, 14.0, 15.0))]
  rows = [digits_results.summary_row('labeled_only', seed, s) for seed, s in enumerate(summaries)]
  plain = digits_results.table(rows)
  assert 'at best validation' not in plain and 'best' not in plain
  assert '| Labeled only (30 labels) | 2 | 11.00 ± 1.00 | 13.00 ± 1.00 | 60 |' in plain
  with_validation = digits_results.table(rows, validation_size=50)
  assert '| test error % (at best validation) |' in with_validation
  assert '| 11.00 ± 1.00 | 13.00 ± 1.00 | 13.00 ± 2.00 | 60 |' in with_validation
  note = digits_results.protocol_note(rows, 50)
  assert 'median over the last 20 evaluations' in note and 'No column selects on the test set' in note
  short = [{**row, 'median_last_20_count': 7} for row in rows]
  assert 'the last 7 evaluations' in digits_results.protocol_note(short)
