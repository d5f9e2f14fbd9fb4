"""Per-seed errors of a results table, and one row compared with each other row seed by seed.

A results command (`experiments.digits_results`, `experiments.fashion_mnist_results`) writes a CSV of
every run into its --out. Runs of one seed share the labeled split and the validation split, so
the comparison is paired: for each other row, the per-seed differences (other - reference), their
mean, their standard deviation (ddof 1), the paired t statistic (mean / (sd / sqrt(n))) and how
many seeds favour each side. On the test set of n images one run's error has a binomial standard
error of sqrt(p (1 - p) / n), stated beside each row so that a difference can be read against it.

  python -m experiments.paired_seeds --out=results/fashion_mnist --reference=semimeta \\
      --test_examples=10000 [--column=final_error_top1]
"""

import argparse
import csv
import math
import pathlib
import sys

COLUMNS = ('final_error_top1', 'median_last_20_error_top1', 'test_error_top1_at_best_validation')


def read_runs(out: pathlib.Path) -> dict[str, dict[int, dict]]:
  """{variant: {seed: row}} over every runs_*.csv in `out` (a later file's row replaces an earlier's)."""
  runs: dict[str, dict[int, dict]] = {}
  for path in sorted(out.glob('runs_*.csv')):
    with open(path, newline='', encoding='utf-8') as f:
      for row in csv.DictReader(f):
        runs.setdefault(row['variant'], {})[int(row['seed'])] = row
  return runs


def _value(row, column):
  text = row.get(column)
  return None if text in (None, '') else float(text)


def per_seed_table(runs, column: str) -> str:
  """Markdown: one line per variant, its error at every seed, then the mean."""
  seeds = sorted({seed for by_seed in runs.values() for seed in by_seed})
  lines = ['| variant | ' + ' | '.join(f'seed {s}' for s in seeds) + ' | mean |',
           '|' + '---|' * (len(seeds) + 2)]
  for variant, by_seed in runs.items():
    values = [_value(by_seed[s], column) if s in by_seed else None for s in seeds]
    known = [v for v in values if v is not None]
    mean = f'{sum(known) / len(known):.2f}' if known else '-'
    lines.append(f'| {variant} | ' + ' | '.join('-' if v is None else f'{v:.2f}' for v in values)
                 + f' | {mean} |')
  return '\n'.join(lines)


def paired(reference: dict[int, dict], other: dict[int, dict], column: str):
  """(seeds, mean difference other - reference, sd, t, wins of reference, wins of other)."""
  seeds = sorted(s for s in reference if s in other and _value(reference[s], column) is not None
                 and _value(other[s], column) is not None)
  diffs = [_value(other[s], column) - _value(reference[s], column) for s in seeds]
  n = len(diffs)
  if n == 0:
    return seeds, math.nan, math.nan, math.nan, 0, 0
  mean = sum(diffs) / n
  sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else math.nan
  t = mean / (sd / math.sqrt(n)) if n > 1 and sd > 0 else math.nan
  return seeds, mean, sd, t, sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)


def paired_table(runs, reference: str, column: str, test_examples: int) -> str:
  """Markdown: each other variant against `reference`, paired by seed."""
  base = runs[reference]
  lines = ['| variant | seeds | mean error % | other - reference (mean ± sd) | paired t | '
           'seeds where reference is better / worse | binomial s.e. of one run |',
           '|---|---|---|---|---|---|---|']
  for variant, by_seed in runs.items():
    if variant == reference:
      continue
    seeds, mean, sd, t, better, worse = paired(base, by_seed, column)
    errors = [_value(by_seed[s], column) for s in seeds]
    level = sum(errors) / len(errors) if errors else math.nan
    se = 100 * math.sqrt(level / 100 * (1 - level / 100) / test_examples) if errors else math.nan
    fmt = lambda v, spec='+.2f': '-' if math.isnan(v) else format(v, spec)
    lines.append(f'| {variant} | {len(seeds)} | {fmt(level, ".2f")} | {fmt(mean)} ± {fmt(sd, ".2f")} | '
                 f'{fmt(t, ".2f")} | {better} / {worse} | {fmt(se, ".2f")} |')
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='the results folder of a results command')
  parser.add_argument('--reference', default='semimeta', help='the variant every other is paired with')
  parser.add_argument('--column', default='final_error_top1', choices=COLUMNS)
  parser.add_argument('--test_examples', type=int, required=True, help='size of the test set')
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  runs = read_runs(out)
  if args.reference not in runs:
    parser.exit(2, f'error: no runs of {args.reference!r} in {out} (found {sorted(runs)})\n')
  text = (f'Per-seed test error % ({args.column}):\n\n{per_seed_table(runs, args.column)}\n\n'
          f'Paired by seed against {args.reference}:\n\n'
          f'{paired_table(runs, args.reference, args.column, args.test_examples)}\n')
  print(text)
  (out / f'paired_{args.reference}_{args.column}.md').write_text(text, encoding='utf-8')


if __name__ == '__main__':
  main(sys.argv[1:])
