r"""Plots test-error curves of training runs from their metrics.jsonl files.

Runs with the same label (e.g. several seeds of one method) are drawn as their
mean with a min/max band, like the paper's baseline-vs-SemiMeta figure:

  python -m experiments.plot_curves \
    --runs 'runs/supervised_seed*,runs/semimeta_seed*' \
    --labels Supervised,SemiMeta --out results/curves.png

Each comma-separated entry of --runs is a directory or a glob; --labels, if
given, names each entry (every directory an entry expands to gets its label).
Without --labels a run is labelled by its directory name less a trailing seed
suffix (`_seed3`, `-s2`, ...), so seeds of one configuration group together.
A table of the final errors is printed.
"""

import argparse
import collections
import glob
import json
import os
import re
import sys

import matplotlib

matplotlib.use('Agg')  # Files only; no display is needed or assumed.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

METRIC = 'eval/error_top1'
_SEED_SUFFIX = re.compile(r'[_\-.]?seed[_\-=]?\d+$|[_\-.]s\d+$')


def load_curve(run_dir: str, metric: str = METRIC) -> tuple[np.ndarray, np.ndarray]:
  """Reads (steps, values) of `metric` from `<run_dir>/metrics.jsonl`.

  Rows without the metric (or with a null value) are skipped. A resumed run
  repeats some steps; the last row of a step wins. A torn last line is skipped.

  Args:
    run_dir: a run directory holding metrics.jsonl.
    metric: the key to read.

  Returns:
    Increasing steps and their values, as arrays.
  """
  values = {}
  path = os.path.join(run_dir, 'metrics.jsonl')
  with open(path) as f:
    lines = f.read().splitlines(keepends=True)
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      if number == len(lines) and not line.endswith('\n'):
        # A run stopped in the middle of writing its last row.
        print(f'warning: ignoring the torn last line of {path}', file=sys.stderr)
        continue
      raise
    if row.get(metric) is not None:
      values[int(row['step'])] = float(row[metric])
  steps = np.array(sorted(values), dtype=np.int64)
  return steps, np.array([values[s] for s in steps], dtype=np.float64)


def default_label(run_dir: str) -> str:
  """The directory name without a trailing seed suffix."""
  name = os.path.basename(os.path.normpath(run_dir))
  return _SEED_SUFFIX.sub('', name) or name


def expand_runs(runs: str, labels: str | None) -> dict[str, list[str]]:
  """Maps each label to its run directories, in the order the labels first appear.

  Args:
    runs: comma-separated directories or globs.
    labels: comma-separated labels, one per entry of `runs`, or None.

  Returns:
    {label: [run directories]}.

  Raises:
    ValueError: on a label count mismatch or an entry that matches no run.
  """
  entries = [entry for entry in runs.split(',') if entry]
  names = labels.split(',') if labels else [None] * len(entries)
  if len(names) != len(entries):
    raise ValueError(f'{len(names)} labels for {len(entries)} --runs entries.')
  groups = collections.OrderedDict()
  for entry, name in zip(entries, names):
    dirs = sorted(d for d in glob.glob(entry)
                  if os.path.isfile(os.path.join(d, 'metrics.jsonl')))
    if not dirs:
      raise ValueError(f'No run directory with a metrics.jsonl matches {entry!r}.')
    for run_dir in dirs:
      groups.setdefault(name or default_label(run_dir), []).append(run_dir)
  return groups


def aggregate(curves: list[tuple[np.ndarray, np.ndarray]]):
  """Mean, min and max over runs, at the steps every run has.

  Args:
    curves: (steps, values) per run.

  Returns:
    (steps, mean, low, high) arrays.

  Raises:
    ValueError: if the runs share no evaluation step.
  """
  common = curves[0][0]
  for steps, _ in curves[1:]:
    common = np.intersect1d(common, steps)
  if not common.size:
    raise ValueError('The runs of a label share no evaluation step.')
  stacked = np.stack([values[np.searchsorted(steps, common)] for steps, values in curves])
  return common, stacked.mean(0), stacked.min(0), stacked.max(0)


def plot(groups: dict[str, list[str]], out: str, *, metric: str = METRIC,
         title: str | None = None) -> dict[str, dict[str, float]]:
  """Draws one curve (and band) per label and saves the figure to `out`.

  Args:
    groups: {label: [run directories]}.
    out: the PNG path.
    metric: the metric to plot (an error in percent).
    title: optional figure title.

  Returns:
    {label: {'runs': n, 'final_mean', 'final_min', 'final_max', 'step'}}, the
    errors at the last step all runs of the label reached.
  """
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  finals = {}
  for label, run_dirs in groups.items():
    curves = [load_curve(d, metric) for d in run_dirs]
    curves = [c for c in curves if c[0].size]
    if not curves:
      raise ValueError(f'No {metric} rows in the runs of {label!r}: {run_dirs}.')
    steps, mean, low, high = aggregate(curves)
    (line,) = ax.plot(steps, mean, label=f'{label} (n={len(curves)})')
    if len(curves) > 1:
      ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    finals[label] = {'runs': len(curves), 'step': int(steps[-1]),
                     'final_mean': float(mean[-1]), 'final_min': float(low[-1]),
                     'final_max': float(high[-1])}
  ax.set_xlabel('training step')
  ax.set_ylabel('test error (%)')
  if title:
    ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=150)
  plt.close(fig)
  return finals


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--runs', required=True, help='comma-separated run directories or globs')
  parser.add_argument('--labels', default=None, help='comma-separated label per --runs entry')
  parser.add_argument('--out', default='curves.png', help='output PNG')
  parser.add_argument('--metric', default=METRIC, help='metric to plot, in percent')
  parser.add_argument('--title', default=None)
  args = parser.parse_args(argv)
  groups = expand_runs(args.runs, args.labels)
  finals = plot(groups, args.out, metric=args.metric, title=args.title)
  print(f'{"label":<24} {"runs":>4} {"step":>8} {"mean":>7} {"min":>7} {"max":>7}')
  for label, f in finals.items():
    print(f'{label:<24} {f["runs"]:>4} {f["step"]:>8} {f["final_mean"]:>7.2f} '
          f'{f["final_min"]:>7.2f} {f["final_max"]:>7.2f}')
  print(f'Wrote {args.out}')
  return finals


if __name__ == '__main__':
  main(sys.argv[1:])
