"""The dense output-space system of `implicit_spectrum`: its matrix, its solutions and its tables."""

import functools

from absl import app
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import implicit_convergence
from experiments import implicit_spectrum
from experiments import semimeta_run_states
from semimeta_jax import models
from semimeta_jax import state as state_lib
from semimeta_jax.methods import common
from semimeta_jax.methods import hypergrad
from semimeta_jax.methods import hypergrad_output_space
from tests.conftest import synthetic_batch
from tests.conftest import tiny_config
from tests.test_train import mock_config
from tests.test_train import run


def spread_system(seed=0, size=12):
  """A PSD G with eigenvalues from 10 down to 1e-6 and two exact zeros, and a b in its range."""
  rng = np.random.default_rng(seed)
  basis, _ = np.linalg.qr(rng.normal(size=(size, size)))
  eigenvalues = np.concatenate([np.geomspace(10.0, 1e-6, size - 2), [0.0, 0.0]])
  gram = basis @ np.diag(eigenvalues) @ basis.T
  rhs = gram @ rng.normal(size=size)
  return gram, rhs, eigenvalues


def test_neumann_in_eigenbasis_is_the_series():
  gram, rhs, _ = spread_system()
  eigenvalues, eigenvectors = np.linalg.eigh(gram)
  scale, terms = 0.05, 7
  reference = scale * sum(np.linalg.matrix_power(np.eye(len(gram)) - scale * gram, k)
                          for k in range(terms)) @ rhs
  np.testing.assert_allclose(
      implicit_spectrum.neumann_in_eigenbasis(eigenvalues, eigenvectors, rhs, scale=scale,
                                              num_terms=terms), reference, rtol=1e-10, atol=1e-12)


def test_analysis_measures_against_the_dense_solution():
  gram, rhs, eigenvalues = spread_system()
  result = implicit_spectrum.analyse(gram, rhs, scale=0.05, dampings=[1e-6, 1.0],
                                     cg_counts=[1, 24], horizons=[1, 10**6])
  np.testing.assert_allclose(result['largest_eigenvalue'], 10.0, rtol=1e-10)
  # Relative to the largest: below 1e-5 are the two zeros, 1e-6 and 6e-6.
  assert result['eigenvalues_below']['1e-06'] == 4 == np.sum(eigenvalues < 1e-5)
  assert result['eigenvalues_below']['0.01'] == np.sum(eigenvalues < 0.1)
  tight, loose = result['dampings']
  np.testing.assert_allclose(tight['condition_number'], (10.0 + 1e-6) / 1e-6)
  # Well conditioned, CG in float32 reaches the float64 solution; 1e13 apart, one step does not.
  assert loose['cg'][24]['cosine'] > 1 - 1e-6 and loose['cg'][24]['relative_error'] < 1e-5
  assert tight['cg'][1]['cosine'] < 0.9
  # A long horizon passes a damping of 1 (cut-off ~1) and tends to the tiny one's limit.
  assert loose['neumann'][1]['cosine'] < tight['neumann'][10**6]['cosine']
  assert tight['neumann'][10**6]['cosine'] > tight['neumann'][1]['cosine']
  assert 'damping | condition' in implicit_spectrum.markdown(
      [{'step': 3, 'batch': 0, 'alpha': 0.1, 'analysis': result}], header='h')


@pytest.mark.slow  # A ConvLarge's dense Jacobian, and 80 CG steps.
def test_dense_system_is_the_matrix_free_one():
  config = tiny_config()
  state = state_lib.init_train_state(config, models.get_model(config, 10), (8, 8, 1), jax.random.key(0))
  batch = synthetic_batch(jax.random.key(1), batch_size=4)
  gram, rhs = implicit_spectrum.dense_system(state, batch['labeled'], batch['unlabeled'])
  assert gram.shape == (40, 40) and rhs.shape == (40,)
  np.testing.assert_allclose(gram, gram.T, rtol=1e-4, atol=1e-6)
  # Built per example; the matrix-free products are of the whole batch.
  apply_fn = functools.partial(common.eval_forward, state)
  probs_fn = lambda p: jax.nn.softmax(apply_fn(p, batch['unlabeled']['image']))
  jacobian_times, transpose_times = hypergrad_output_space.output_jacobian_products(probs_fn, state.params)
  w = jax.random.normal(jax.random.key(2), (4, 10))
  np.testing.assert_allclose(gram @ w.ravel(), jacobian_times(transpose_times(w)).ravel(),
                             rtol=1e-4, atol=1e-6)
  # Its damped solve is what `hypergrad.implicit` converges to, matrix-free.
  implicit = hypergrad.implicit(apply_fn, state.params, batch['labeled']['image'],
                                batch['labeled']['label'], batch['unlabeled']['image'], None,
                                cg_iterations=80, cg_damping=0.5)
  dense = np.linalg.solve(np.asarray(gram, np.float64) + 0.5 * np.eye(40), np.asarray(rhs, np.float64))
  assert implicit_spectrum.compare(np.asarray(implicit, np.float64).ravel(), dense)['relative_error'] < 1e-3
  assert jnp.all(jnp.isfinite(gram))


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """A tiny SemiMeta run on mock CIFAR-10 with checkpoints at steps 3 and 6."""
  tmp_path = tmp_path_factory.mktemp('implicit_run')
  config = mock_config(tmp_path)
  run(config, tmp_path / 'run')
  return tmp_path / 'run'


@pytest.mark.slow  # Trains the run; both experiments read it back.
def test_both_experiments_read_a_finished_runs_states(finished_run):
  config = semimeta_run_states.saved_semimeta_config(finished_run)
  with tfds.testing.mock_data(num_examples=40):
    results = implicit_spectrum.spectrum_results(finished_run, config, [6, 0, 3], num_batches=1,
                                                 dampings=[1.0], cg_counts=[2, 80], horizons=[1])
    rows = implicit_convergence.convergence_results(finished_run, config, [3], num_batches=2,
                                                    iterations=[1, 4], loop_unroll=4)
    with pytest.raises(app.UsageError, match='no checkpoint of step'):
      implicit_spectrum.spectrum_results(finished_run, config, [4], num_batches=1, dampings=[1.0],
                                         cg_counts=[2], horizons=[1])
  assert [r['step'] for r in results] == [0, 3, 6]
  batch, classes = config.unlabeled_batch_size, 10
  for r in results:
    analysis = r['analysis']
    assert analysis['size'] == batch * classes
    # Softmax rows sum to one: at least one null direction per unlabeled example.
    assert analysis['eigenvalues_below']['1e-06'] >= batch
    assert analysis['dampings'][0]['cg'][80]['relative_error'] < 1e-3
  assert [(r['step'], r['cg_iterations']) for r in rows] == [(3, 1), (3, 4)]
  assert rows[1]['cosine'] == pytest.approx(1.0) and rows[0]['cosine'] < 1.0
