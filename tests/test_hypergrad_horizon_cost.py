"""The meta-step cost table against K: exact (unrolled) and neumann (output space) side by side."""

import pytest

from experiments import hypergrad_horizon_cost
from tests.conftest import tiny_config


def _row(forward_mode, mode, k, ms, temp):
  return {'forward_mode': forward_mode, 'mode': mode, 'inner_steps': k, 'compile_s': 1.0,
          'median_ms': ms, 'temp_mib': temp, 'compiled_mib': temp + 1.0}


def test_table_pairs_the_two_modes_at_each_k():
  rows = [_row('eval', 'exact', 1, 2.0, 0.25), _row('eval', 'neumann', 1, 1.5, 0.2),
          _row('eval', 'exact', 4, 9.0, 1.0), _row('eval', 'neumann', 4, 3.0, 0.26),
          _row('eval', 'implicit', 1, 7.0, 0.3)]
  lines = hypergrad_horizon_cost.horizon_cost_table(rows).splitlines()
  assert lines[0].startswith('| meta forward | K | exact ms | neumann ms | exact temp MiB |')
  assert lines[2:] == ['| eval | 1 | 2.0 | 1.5 | 0.25 | 0.20 | 1.0 | 1.0 |',
                       '| eval | 4 | 9.0 | 3.0 | 1.00 | 0.26 | 1.0 | 1.0 |',
                       '| eval | implicit | - | 7.0 | - | 0.30 | - | 1.0 |']


@pytest.mark.slow  # Compiles five meta steps.
def test_unrolled_memory_grows_with_k_and_the_series_does_not_more():
  config = tiny_config(**{'hypergrad.cg_iterations': 2})
  rows = hypergrad_horizon_cost.horizon_cost_rows(config, (8, 8, 1), num_classes=10,
                                                  forward_modes=['eval'], horizons=[1, 4], repeats=1)
  cost = {(r['mode'], r['inner_steps']): r for r in rows}
  assert set(cost) == {('exact', 1), ('neumann', 1), ('exact', 4), ('neumann', 4), ('implicit', 1)}
  exact_growth = cost[('exact', 4)]['temp_mib'] - cost[('exact', 1)]['temp_mib']
  series_growth = cost[('neumann', 4)]['temp_mib'] - cost[('neumann', 1)]['temp_mib']
  assert exact_growth > 0 and series_growth < exact_growth / 2, (exact_growth, series_growth)
  assert all(r['median_ms'] > 0 and r['compiled_mib'] >= r['temp_mib'] for r in rows)


def test_unrolled_rows_add_their_own_columns():
  unrolled = lambda row, unroll: {**row, 'loop_unroll': unroll}
  rows = [_row('eval', 'exact', 4, 9.0, 1.0), _row('eval', 'neumann', 4, 30.0, 0.26),
          _row('eval', 'implicit', 1, 70.0, 0.3), unrolled(_row('eval', 'neumann', 4, 3.0, 0.4), 4),
          unrolled(_row('eval', 'implicit', 1, 6.0, 0.5), 20)]
  lines = hypergrad_horizon_cost.horizon_cost_table(rows).splitlines()
  assert lines[0].endswith('| neumann unrolled ms | neumann unrolled temp MiB |')
  assert lines[1] == '|---' * 10 + '|'
  assert lines[2:] == ['| eval | 4 | 9.0 | 30.0 | 1.00 | 0.26 | 1.0 | 1.0 | 3.0 | 0.40 |',
                       '| eval | implicit | - | 70.0 | - | 0.30 | - | 1.0 | 6.0 | 0.50 |']
