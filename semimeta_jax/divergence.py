"""What to do when training diverges: a learning rate read from where the run diverged.

Dividing the rate by ten rescues a run that trained for a while and then blew
up; it does not rescue one whose rate is orders of magnitude too large (1e4
becomes 1e3, which diverges again at the first step). The advice therefore
looks at the rate itself and at the run's history in metrics.jsonl (the loss
and gradient norm of each report before the non-finite one).
"""

import math
from typing import Any, Sequence

# The learning rate the shipped configs train SGD with. A rate a hundred times
# larger is not a tuning choice but a slip (an exponent, a missing dot): even a
# tenth of it is ten times too large.
REFERENCE_LEARNING_RATE = 0.1
_IMPLAUSIBLE_FACTOR = 100.0


def _finite(row: dict[str, Any], key: str) -> float | None:
  value = row.get(key)
  return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _history(rows: Sequence[dict[str, Any]]) -> list[tuple[int, float, float | None]]:
  """(step, loss, gradient norm) of every report with a finite training loss, in step order."""
  out = []
  for row in rows:
    loss = _finite(row, 'train/loss')
    if loss is not None:
      out.append((int(row.get('step', 0)), loss, _finite(row, 'train/grad_norm')))
  return sorted(out)


def advised_learning_rate(learning_rate: float, rows: Sequence[dict[str, Any]]
                          ) -> tuple[float, str]:
  """A learning rate to resume a diverged run with, and why.

  Args:
    learning_rate: the run's `config.learning_rate`.
    rows: the run's metrics.jsonl rows logged before the divergence.

  Returns:
    (the advised rate, one sentence saying what in the run led to it).
  """
  if learning_rate > _IMPLAUSIBLE_FACTOR * REFERENCE_LEARNING_RATE:
    orders = round(math.log10(learning_rate / REFERENCE_LEARNING_RATE))
    return REFERENCE_LEARNING_RATE, (
        f'config.learning_rate={learning_rate:g} is {orders} orders of magnitude above the '
        f'{REFERENCE_LEARNING_RATE:g} the shipped configs train SGD with: far too large, and a '
        f'tenth of it would diverge again')
  history = _history(rows)
  if not history:
    return learning_rate / 100, (
        'the loss was never finite in a report, so the rate is too large from the start')
  first_loss, last_loss = history[0][1], history[-1][1]
  norms = [norm for _, _, norm in history if norm is not None]
  growth = norms[-1] / norms[0] if len(norms) >= 2 and norms[0] > 0 else 1.0
  if last_loss > 2 * min(loss for _, loss, _ in history) or growth > 100:
    evidence = (f'the loss rose to {last_loss:.4g} (from {first_loss:.4g} at step {history[0][0]})'
                f'{f" and the gradient norm grew {growth:.0f}-fold" if growth > 100 else ""} '
                f'by step {history[-1][0]}, an instability that builds up')
    return learning_rate / 100, evidence
  return learning_rate / 10, (
      f'the loss was still falling (to {last_loss:.4g} at step {history[-1][0]}) before it jumped, '
      'which a smaller rate usually survives; a bad input batch can also do this')


def advice(learning_rate: float, rows: Sequence[dict[str, Any]]) -> str:
  """The sentence a non-finite loss error ends with: the rerun command and its reason."""
  rate, why = advised_learning_rate(learning_rate, rows)
  return (f'To go on from there with a lower learning rate, rerun the same command with '
          f'--config.allow_config_change=True --config.learning_rate={rate:g} added ({why}; or '
          'check the input data).')
