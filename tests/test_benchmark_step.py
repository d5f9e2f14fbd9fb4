"""Smoke test of the compiled-step benchmark at a tiny size."""

import csv
import math

import pytest

from experiments import benchmark_step


@pytest.mark.slow
def test_measure_step_rows_and_table(tmp_path):
  rows = []
  for mode in ('supervised', 'exact'):
    config = benchmark_step.make_config(mode, model='convlarge_digits', model_width=4, batch_size=8)
    config.dropout_rate = 0.0  # Dropout's random draws double XLA:CPU's compile time here.
    rows.append(benchmark_step.measure_step(config, num_classes=10, image_shape=(8, 8, 1), steps=2,
                                            warmup_steps=1))
  supervised, exact = rows

  for row in rows:
    assert row['compile_s'] > 0 and row['median_step_ms'] > 0
    assert row['min_step_ms'] <= row['median_step_ms'] <= row['max_step_ms']
    assert row['flops'] > 0 and row['compiled_mib'] > 0
    assert math.isclose(row['achieved_gflop_per_s'], row['flops'] / 1e6 / row['median_step_ms'])
  # The meta step adds the hypergradient and a second forward on the unlabeled batch.
  assert exact['flops'] > 2 * supervised['flops']
  assert (supervised['images_per_step'], exact['images_per_step']) == (8, 16)
  assert (supervised['name'], exact['name']) == ('supervised', 'semimeta / exact')

  md_path, csv_path = benchmark_step.write_results(rows, str(tmp_path), 'tiny', notes=['A note.'])
  table = open(md_path).read().splitlines()
  assert table[0] == 'A note.'
  assert table[2].startswith('| device | XLA_FLAGS |') and len(table) == 6
  assert 'semimeta / exact' in table[5] and f'{exact["gflop_per_step"]:.4g}' in table[5]
  with open(csv_path) as f:
    saved = list(csv.DictReader(f))
  assert [r['mode'] for r in saved] == ['', 'exact']
  assert float(saved[1]['flops']) == exact['flops']


def test_flag_variants_resolve_presets_and_raw_flags():
  variants = benchmark_step.resolve_flag_variants('default; no_ynn_conv;--xla_foo=1')
  assert variants == ['', benchmark_step.XLA_FLAG_PRESETS['no_ynn_conv'], '--xla_foo=1']


@pytest.mark.slow
def test_a_preset_row_runs_its_method_with_the_papers_fields():
  config = benchmark_step.make_config('mt_sntg', model='convlarge_digits', model_width=4, batch_size=8)
  assert config.method == 'mean_teacher' and config.sntg.weight > 0  # The preset's method and fields.
  assert config.warmup_steps == 0 and config.consistency_rampup_steps == 0  # As after the ramps.
  config.dropout_rate = 0.0
  row = benchmark_step.measure_step(config, num_classes=10, image_shape=(8, 8, 1), steps=1,
                                    warmup_steps=0, name='mt_sntg (CIFAR-10 preset)')
  assert row['name'] == 'mt_sntg (CIFAR-10 preset)' and row['mode'] == ''
  assert row['images_per_step'] == 16 and row['median_step_ms'] > 0
  assert 'tnar_vae' not in benchmark_step.preset_modes()  # Needs a trained VAE of the input shape.
  with pytest.raises(ValueError, match='Unknown mode'):
    benchmark_step.make_config('tnar_vae', model='convlarge_digits', model_width=4, batch_size=8)


def test_imagenet_rows_read_their_presets_from_the_imagenet_config():
  config = benchmark_step.make_config('co_training', model='convlarge_digits', model_width=4,
                                      batch_size=8, presets_of='imagenet')
  assert config.method == 'co_training' and config.data.name == 'imagenet2012'
  assert config.model == 'convlarge_digits' and config.labeled_batch_size == 8  # The benchmark's size.
  assert 'co_training' in benchmark_step.preset_modes('imagenet')
  with pytest.raises(ValueError, match='Unknown mode'):  # A CIFAR-10-only preset is no ImageNet row.
    benchmark_step.make_config('vat_vadd', model='convlarge_digits', model_width=4, batch_size=8,
                               presets_of='imagenet')
