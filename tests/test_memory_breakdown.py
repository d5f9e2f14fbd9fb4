"""experiments/memory_breakdown.py: its table, and the saving it reports for config.remat."""

import pytest

from experiments import memory_breakdown


@pytest.mark.slow
def test_small_table_reports_the_batch_norm_saving(tmp_path):
  rows = memory_breakdown.main(['--small', '--modes=supervised', '--precisions=bf16',
                                f'--out={tmp_path}'])
  by_policy = {row['remat']: row for row in rows}
  assert set(by_policy) == {'none', 'batch_norm'}
  plain, rematted = by_policy['none'], by_policy['batch_norm']
  # Batch norm's float32 residuals ('sub', 'mul') are gone; its bf16 input is kept instead.
  assert 'sub ' in plain['residual_by_kind'] and 'sub ' not in rematted['residual_by_kind']
  assert 'conv_general_dilated' in rematted['residual_by_kind']
  assert rematted['residual_mib'] < 0.6 * plain['residual_mib']
  for row in rows:
    assert row['compiled_mib'] >= row['temp_mib'] > 0
  table = (tmp_path / 'memory_breakdown_small_cpu.md').read_text()
  assert '| supervised | bf16 | batch_norm |' in table
  assert (tmp_path / 'memory_breakdown_small_cpu.csv').read_text().count('\n') == 3
