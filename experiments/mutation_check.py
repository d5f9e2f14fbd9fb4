"""Mutation check: plant realistic bugs one at a time and see the fast tests fail.

Each mutant (listed in `experiments/mutants.py`, `mutants_evaluation_models.py`,
`mutants_methods_data.py`, `mutants_new_methods.py`, `mutants_two_networks.py`,
`mutants_mpl.py`)
replaces one exact snippet of a core module (hypergrad, losses, schedules, methods,
evaluation, models) in a fresh copy of
the repository, then runs the mutant's fast test subset there (`pytest -x`). A
mutant is *killed* when the subset fails (or runs past `--timeout`), *survived*
when it passes. Before any mutant runs, every snippet must occur exactly once in
its file (so a refactor that renames code stops the check instead of silently
skipping mutants), and the unmutated copy must pass every subset (so a kill means
the bug, not a broken suite).

Usage (from the repository root; the full check took ~11 minutes on 2 CPU cores before the
newest methods' mutants, which take ~10 minutes more on their own, the last line below):
  python -m experiments.mutation_check --out /tmp/mutation.md
  python -m experiments.mutation_check --only schedules --list
  python -m experiments.mutation_check --only=sm-mixup
  python -m experiments.mutation_check --only=sntg-,vadd-,tnar-,vae-,madnn-,adanet-,cot-,dual-,second-

Exits 1 when the kill rate is below `--min-kill-rate` (default 0.95).
"""

import argparse
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from experiments import mutants
from experiments import mutants_evaluation_models
from experiments import mutants_fixmatch_family
from experiments import mutants_methods_data
from experiments import mutants_mpl
from experiments import mutants_new_methods
from experiments import mutants_two_networks

# The checkout whose files are copied and mutated.
ROOT = pathlib.Path(__file__).resolve().parent.parent

MUTANTS = (mutants.MUTANTS + mutants_evaluation_models.MUTANTS + mutants_methods_data.MUTANTS
           + mutants_new_methods.MUTANTS + mutants_two_networks.MUTANTS + mutants_fixmatch_family.MUTANTS
           + mutants_mpl.MUTANTS)

# What a test run needs; everything else (results, .git) stays behind.
COPIED = ('semimeta_jax', 'tests', 'configs', 'experiments', 'pyproject.toml', 'setup.cfg')


@dataclasses.dataclass
class Result:
  mutant: object
  status: str  # killed | survived | timeout
  seconds: float
  killed_by: str = ''  # The first failing test, as pytest names it.


def check_snippets(mutants, root=ROOT):
  """Raises SystemExit naming every mutant whose snippet is not found exactly once."""
  problems = []
  for m in mutants:
    path = root / m.file
    if not path.exists():
      problems.append(f'{m.name}: {m.file} does not exist')
      continue
    count = path.read_text().count(m.original)
    if count != 1:
      problems.append(f'{m.name}: snippet found {count} times in {m.file}: {m.original!r}')
    if m.original == m.mutated:
      problems.append(f'{m.name}: the mutated snippet equals the original')
  if problems:
    raise SystemExit('Mutation check: stale mutants (update experiments/mutants*.py):\n  '
                     + '\n  '.join(problems))


def copy_repository(destination, source_root=ROOT):
  for name in COPIED:
    source = source_root / name
    if source.is_dir():
      shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
    elif source.exists():
      shutil.copy2(source, destination / name)


def run_tests(root, tests, timeout):
  """Runs `pytest -x` on `tests` in `root`; returns (returncode or None on timeout, seconds)."""
  env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE='1')
  command = [sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', *tests]
  start = time.monotonic()
  try:
    completed = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return None, time.monotonic() - start, ''
  return completed.returncode, time.monotonic() - start, completed.stdout + completed.stderr


def first_failure(output):
  """'test_file.py::test_name' of the first FAILED/ERROR line of pytest's summary."""
  for line in output.splitlines():
    if line.startswith(('FAILED ', 'ERROR ')):
      return line.split()[1].split('/')[-1]
  return ''


def run_mutant(mutant, snapshot, timeout):
  """Applies `mutant` to a fresh copy of `snapshot` and runs its tests there."""
  with tempfile.TemporaryDirectory(prefix='mutant-') as tmp:
    root = pathlib.Path(tmp)
    copy_repository(root, snapshot)
    path = root / mutant.file
    path.write_text(path.read_text().replace(mutant.original, mutant.mutated, 1))
    returncode, seconds, output = run_tests(root, mutant.tests, timeout)
  if returncode is None:
    return Result(mutant, 'timeout', seconds)
  # 1 = a test failed; 2-4 = collection or usage errors, still the mutant's doing
  # since the baseline passed; 5 = no tests collected, a broken subset.
  if returncode == 5:
    raise SystemExit(f'{mutant.name}: no tests collected from {mutant.tests}')
  return Result(mutant, 'killed' if returncode else 'survived', seconds, first_failure(output))


def baseline(mutants, snapshot, timeout):
  """The unmutated code must pass every subset the mutants use."""
  subsets = sorted({test for m in mutants for test in m.tests})
  with tempfile.TemporaryDirectory(prefix='mutant-baseline-') as tmp:
    root = pathlib.Path(tmp)
    copy_repository(root, snapshot)
    returncode, seconds, output = run_tests(root, subsets, 4 * timeout)
  if returncode != 0:
    raise SystemExit(f'Mutation check: the unmutated code fails its own subset {subsets}:\n{output[-3000:]}')
  return seconds


def table(results, baseline_seconds, total_seconds):
  killed = sum(r.status != 'survived' for r in results)
  rate = killed / len(results) if results else 0.0
  lines = [
      f'Mutation check: {killed} of {len(results)} mutants killed ({100 * rate:.1f}%) in '
      f'{total_seconds / 60:.1f} min (baseline subset passed in {baseline_seconds:.0f} s).',
      '',
      '| # | mutant | file | planted bug | result | first failing test | s |',
      '|---|---|---|---|---|---|---|',
  ]
  for i, r in enumerate(results, 1):
    lines.append(f'| {i} | {r.mutant.name} | {r.mutant.file.removeprefix("semimeta_jax/")} | '
                 f'{r.mutant.description} | {r.status} | {r.killed_by} | {r.seconds:.0f} |')
  survivors = [r.mutant.name for r in results if r.status == 'survived']
  lines += ['', f'Survivors: {", ".join(survivors) if survivors else "none"}.']
  return '\n'.join(lines) + '\n', rate


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--only', default='',
                      help='Run the mutants whose name or file contains this (or one of several, '
                           'comma-separated).')
  parser.add_argument('--list', action='store_true', help='List the selected mutants and exit.')
  parser.add_argument('--out', default='', help='Write the markdown table here.')
  parser.add_argument('--timeout', type=float, default=300.0, help='Seconds per mutant run.')
  parser.add_argument('--min-kill-rate', type=float, default=0.95)
  args = parser.parse_args(argv)

  check_snippets(MUTANTS)  # All of them, whatever the filter: stale ones must be noticed.
  patterns = args.only.split(',')
  selected = [m for m in MUTANTS if any(p in m.name or p in m.file for p in patterns)]
  if not selected:
    raise SystemExit(f'No mutant matches --only={args.only!r}.')
  if args.list:
    for m in selected:
      print(f'{m.name:28s} {m.file:34s} {m.description}')
    return 0
  start = time.monotonic()
  with tempfile.TemporaryDirectory(prefix='mutant-snapshot-') as snapshot:
    # One snapshot of the tree: edits made while the check runs do not leak into it.
    snapshot = pathlib.Path(snapshot)
    copy_repository(snapshot)
    check_snippets(selected, snapshot)
    baseline_seconds = baseline(selected, snapshot, args.timeout)
    print(f'baseline passed in {baseline_seconds:.0f} s; running {len(selected)} mutants', flush=True)
    results = []
    for i, mutant in enumerate(selected, 1):
      result = run_mutant(mutant, snapshot, args.timeout)
      results.append(result)
      print(f'[{i}/{len(selected)}] {result.status:8s} {result.seconds:5.0f} s  {mutant.name}: '
            f'{mutant.description}  {result.killed_by}', flush=True)
  report, rate = table(results, baseline_seconds, time.monotonic() - start)
  print(report)
  if args.out:
    pathlib.Path(args.out).write_text(report)
  return 0 if rate >= args.min_kill_rate else 1


if __name__ == '__main__':
  sys.exit(main())
