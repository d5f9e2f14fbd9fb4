"""The paired comparison of a results table against scipy's paired t test."""

import csv

import numpy as np
from scipy import stats

from experiments import paired_seeds


def _write(path, rows):
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=['variant', 'seed', 'final_error_top1'])
    writer.writeheader()
    writer.writerows(rows)


def test_paired_differences_and_t_equal_scipys(tmp_path):
  reference = [12.5, 13.1, 12.9]
  other = [13.4, 13.0, 14.2]
  _write(tmp_path / 'runs_a.csv', [{'variant': 'semimeta', 'seed': s, 'final_error_top1': e}
                                   for s, e in enumerate(reference)])
  # A second file: rows of another command in the same folder, one seed missing.
  _write(tmp_path / 'runs_b.csv', [{'variant': 'vat_ent', 'seed': s, 'final_error_top1': e}
                                   for s, e in enumerate(other)]
         + [{'variant': 'mean_teacher', 'seed': 0, 'final_error_top1': 20.0}])
  runs = paired_seeds.read_runs(tmp_path)
  seeds, mean, sd, t, better, worse = paired_seeds.paired(runs['semimeta'], runs['vat_ent'],
                                                          'final_error_top1')
  assert seeds == [0, 1, 2]
  diffs = np.subtract(other, reference)
  np.testing.assert_allclose(mean, diffs.mean())
  np.testing.assert_allclose(sd, diffs.std(ddof=1))
  np.testing.assert_allclose(t, stats.ttest_rel(other, reference).statistic)
  assert (better, worse) == (2, 1)
  table = paired_seeds.paired_table(runs, 'semimeta', 'final_error_top1', 10000)
  assert '| mean_teacher | 1 | 20.00 | +7.50 ± - | - | 1 / 0 | 0.40 |' in table
  per_seed = paired_seeds.per_seed_table(runs, 'final_error_top1')
  assert '| mean_teacher | 20.00 | - | - | 20.00 |' in per_seed
