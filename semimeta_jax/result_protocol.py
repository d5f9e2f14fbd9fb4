"""What a run reports as its result, from the evaluations it logged: nothing chosen on the test set.

Three figures, each a protocol of the literature, all read from the rows of
`metrics.jsonl` (so a resumed run reports over every evaluation of its workdir):

  * the final test error: the last evaluation's;
  * the median test error of the last 20 evaluations (the FixMatch papers'
    protocol, which smooths the last evaluations' noise without selecting
    any), over fewer when the run made fewer, the count stated;
  * with a validation split (`config.data.validation_size`), the test error
    at the evaluation whose validation error is lowest (the first such on
    ties): a step chosen without looking at the test set.

The lowest test error over the run is not reported: choosing a step on the
test set is selection on test, and its figure is biased low.
"""

from typing import Any, Iterable, Mapping

import numpy as np

LAST_EVALUATIONS = 20
_TEST_PREFIX = 'eval'
_VALIDATION_PREFIX = 'val'


def validation_prefix(prefix: str) -> str:
  """The metric prefix of a weight set's validation errors: 'eval' -> 'val', 'eval_ema' -> 'val_ema'."""
  if prefix.startswith(_TEST_PREFIX):
    return _VALIDATION_PREFIX + prefix[len(_TEST_PREFIX):]
  return f'{_VALIDATION_PREFIX}_{prefix}'


def _evaluations(rows: Iterable[Mapping[str, Any]], key: str) -> dict[int, Mapping[str, Any]]:
  """{step: the last row of that step holding `key`}, in step order."""
  by_step = {}
  for row in rows:
    if row.get(key) is not None and 'step' in row:
      by_step[int(row['step'])] = row
  return dict(sorted(by_step.items()))


def summarize(rows: Iterable[Mapping[str, Any]], headline: str) -> dict[str, Any]:
  """The run's result figures from its metrics rows.

  Args:
    rows: metrics.jsonl's rows ({'step': s, name: value}); non-finite values are None.
    headline: the metric prefix of the reported weight set ('eval', 'eval_ema', ...).

  Returns:
    {'median_last_20_error_top1': median of the last (at most 20) test errors,
     'median_last_20_count': how many evaluations that median is over,
     'best_validation_step', 'best_validation_error_top1',
     'test_error_top1_at_best_validation': at the step of the lowest validation
     error (the first on ties)}; a figure the rows cannot give is None.
  """
  rows = list(rows)
  test_key = f'{headline}/error_top1'
  val_key = f'{validation_prefix(headline)}/error_top1'
  tests = [row[test_key] for row in _evaluations(rows, test_key).values()]
  last = tests[-LAST_EVALUATIONS:]
  out = {
      'median_last_20_error_top1': float(np.median(last)) if last else None,
      'median_last_20_count': len(last),
      'best_validation_step': None,
      'best_validation_error_top1': None,
      'test_error_top1_at_best_validation': None,
  }
  # Evaluations holding both errors of the reported weights (they are logged in one row).
  both = [(step, row[val_key], row[test_key]) for step, row in _evaluations(rows, val_key).items()
          if row.get(test_key) is not None]
  if both:
    best = int(np.argmin([val for _, val, _ in both]))  # argmin: the first of equal minima.
    step, val, test = both[best]
    out.update(best_validation_step=step, best_validation_error_top1=float(val),
               test_error_top1_at_best_validation=float(test))
  return out
