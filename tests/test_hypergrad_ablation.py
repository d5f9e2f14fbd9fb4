"""Smoke test of the exact-vs-approximate hypergradient ablation on a tiny model."""

import functools

import jax
import pytest

from experiments import hypergrad_ablation
from semimeta_jax.methods import hypergrad
from semimeta_jax import models
from semimeta_jax import state as state_lib
from tests.conftest import synthetic_batch, tiny_config


@pytest.fixture(scope='module')
def train_mode_fidelity():
  """Fidelity rows at K = 1 and K = 2 with dropout and batch statistics on (theta~ != theta)."""
  config = tiny_config(**{'hypergrad.forward_mode': 'train', 'learning_rate': 0.5})
  state = state_lib.init_train_state(config, models.get_model(config, 10), (8, 8, 1),
                                     jax.random.key(0))
  batches = [synthetic_batch(jax.random.key(i)) for i in (1, 2)]
  rows = []
  for k in (1, 2):
    fn = jax.jit(functools.partial(
        hypergrad_ablation.fidelity,
        config=hypergrad_ablation.variant_config(config, inner_steps=k)))
    per_batch = jax.device_get([fn(state, batch, 0.5) for batch in batches])
    for reference in ('exact', 'implicit'):
      rows += hypergrad_ablation.fidelity_rows(per_batch, step=0, lr=0.5, forward_mode='train',
                                               inner_steps=k, reference=reference)
  return {(row['reference'], row['inner_steps'], row['mode']): row for row in rows}


@pytest.mark.slow
def test_exact_is_its_own_reference_and_jvp_is_exact_at_one_inner_step(train_mode_fidelity):
  against_exact = {(k, mode): row for (ref, k, mode), row in train_mode_fidelity.items() if ref == 'exact'}
  for k in (1, 2):
    exact = against_exact[(k, 'exact')]
    assert exact['cosine'] == pytest.approx(1.0, abs=1e-6)
    assert exact['relative_error'] < 1e-6
    assert exact['exact_norm'] > 0 and exact['reference_norm'] == exact['exact_norm']
  jvp = against_exact[(1, 'jvp')]
  assert jvp['cosine_min'] > 0.999 and jvp['relative_error_max'] < 0.05
  # K = 1 of the output-space series is the exact one-step formula too.
  assert against_exact[(1, 'neumann')]['relative_error_max'] < 0.05
  # The K = 1 formulas cannot follow a two-step virtual update, nor first order a one-step one.
  assert against_exact[(2, 'jvp')]['relative_error'] > 10 * jvp['relative_error']
  assert against_exact[(1, 'first_order')]['relative_error'] > 10 * jvp['relative_error']
  # The series follows the two steps (Gauss-Newton in training mode) closer than a K = 1 formula.
  assert against_exact[(2, 'neumann')]['relative_error'] < against_exact[(2, 'jvp')]['relative_error']


@pytest.mark.slow
def test_implicit_is_the_second_reference(train_mode_fidelity):
  for k in (1, 2):
    implicit = train_mode_fidelity[('implicit', k, 'implicit')]
    assert implicit['cosine'] == pytest.approx(1.0, abs=1e-6) and implicit['relative_error'] < 1e-6
    assert implicit['reference_norm'] > 0
    # Against `exact` the implicit limit is a different vector (another scale, another direction).
    assert train_mode_fidelity[('exact', k, 'implicit')]['relative_error'] > 1e-3
  lines = hypergrad_ablation.fidelity_table(list(train_mode_fidelity.values()),
                                            reference='implicit').splitlines()
  assert len(lines) == 2 + 2 * (len(hypergrad.MODES) - 1)
  exact_row = train_mode_fidelity[('implicit', 2, 'exact')]
  assert (f'| train | 2 | exact | {exact_row["cosine"]:.5f} / {exact_row["relative_error"]:.2e} |'
          in lines)


@pytest.mark.slow
def test_table_and_plot_render(train_mode_fidelity, tmp_path):
  rows = [row for (ref, _, _), row in train_mode_fidelity.items() if ref == 'exact']
  lines = hypergrad_ablation.fidelity_table(rows).splitlines()
  assert lines[0] == '| meta forward | K | mode | step 0 |'
  # Header, separator, one line per approximation for each K; `exact` is the reference, not a line.
  assert len(lines) == 2 + 2 * len(hypergrad_ablation.APPROXIMATIONS)
  jvp = train_mode_fidelity[('exact', 1, 'jvp')]
  assert f'| train | 1 | jvp | {jvp["cosine"]:.5f} / {jvp["relative_error"]:.2e} |' in lines
  path = tmp_path / 'fidelity.png'
  hypergrad_ablation.plot_fidelity([r for r in rows if r['mode'] != 'exact'], str(path))
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.slow
def test_bf16_fidelity_rows_are_close_to_float32_exact_and_render():
  config = tiny_config(**{'hypergrad.forward_mode': 'train', 'learning_rate': 0.5})
  model = models.get_model(config, 10)
  state = state_lib.init_train_state(config, model, (8, 8, 1), jax.random.key(0))
  half_apply_fn = models.get_model(
      hypergrad_ablation.variant_config(config, half_precision=True), 10).apply
  fn = jax.jit(functools.partial(hypergrad_ablation.half_precision_fidelity, config=config,
                                 half_apply_fn=half_apply_fn))
  per_batch = jax.device_get([fn(state, synthetic_batch(jax.random.key(1)), 0.5)])
  rows = hypergrad_ablation.fidelity_rows(per_batch, step=0, lr=0.5, forward_mode='train',
                                          inner_steps=1, precision='bf16')
  by_mode = {row['mode']: row for row in rows}
  # bf16 rounding moves g, but not far: exact and jvp in bf16 stay near float32 exact.
  for mode in ('exact', 'jvp'):
    assert 0.9 < by_mode[mode]['cosine'] < 1.0 and 0 < by_mode[mode]['relative_error'] < 0.5
  lines = hypergrad_ablation.half_precision_table(rows).splitlines()
  assert lines[0] == '| meta forward | K | mode (bf16) | step 0 |'
  assert len(lines) == 2 + len(hypergrad.MODES)
  # The float32 table leaves the bf16 rows out.
  assert len(hypergrad_ablation.fidelity_table(rows).splitlines()) == 2
