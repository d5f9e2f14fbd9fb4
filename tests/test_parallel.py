"""Data parallelism over a mesh: 8 simulated devices compute what 1 device computes."""

import chex
import jax
import numpy as np
import pytest

from semimeta_jax.methods import hypergrad
from semimeta_jax import methods
from semimeta_jax import models
from semimeta_jax import parallel
from semimeta_jax import state as state_lib
from tests import conftest
from tests.conftest import synthetic_batch, tiny_config

CASES = [('semimeta', mode) for mode in hypergrad.MODES] + [
    (method, 'finite_difference') for method in ('supervised', 'temporal_ensembling', 'vat')]


def one_step(config, mesh, batch):
  """Two steps, in fact: Temporal Ensembling's second one reads the ensemble the first wrote."""
  model = models.get_model(config, 10)
  init = parallel.jit_replicated_init(
      lambda key: methods.init_train_state(config, model, (8, 8, 1), key, num_train=32, num_classes=10),
      mesh)
  state = init(jax.random.key(0))
  step = parallel.jit_train_step(methods.make_train_step(config, 10), mesh)
  global_batch = parallel.to_global(batch, mesh)
  assert global_batch['labeled']['image'].sharding == parallel.batch_sharded(mesh)
  state, _ = step(state, global_batch)
  return step(state, global_batch)


@pytest.mark.slow
@pytest.mark.parametrize('method,mode', CASES)
def test_eight_devices_match_one(method, mode):
  # Train-mode forward in the meta step too, so batch statistics enter every term.
  # VAT with the exact Hessian-vector product: its float32 finite difference at xi = 1e-6 is
  # rounding noise (see methods/vat.py), which a different reduction order reshuffles.
  # `implicit` is on another scale than the official K = 1 beta assumes: that beta turns float32
  # rounding in CG into different pseudo-labels, so it runs with its own beta and a short CG.
  implicit = {'hypergrad.meta_lr': 0.5, 'hypergrad.cg_iterations': 5} if mode == 'implicit' else {}
  config = tiny_config(method=method, vat_xi=0.0,
                       **{'hypergrad.mode': mode, 'hypergrad.forward_mode': 'train', **implicit})
  batch = jax.tree.map(np.asarray, synthetic_batch(jax.random.key(1)))
  state8, metrics8 = one_step(config, parallel.make_mesh(conftest.cpu_devices(8)), batch)
  state1, metrics1 = one_step(config, parallel.make_mesh(conftest.cpu_devices(1)), batch)
  assert len(state8.params['head']['fc']['kernel'].sharding.device_set) == 8
  chex.assert_trees_all_close(state8.params, state1.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state8.batch_stats, state1.batch_stats, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state8.extra, state1.extra, rtol=1e-5, atol=1e-6)  # Per-example buffers.
  chex.assert_trees_all_close(metrics8, metrics1, rtol=1e-4, atol=1e-6)
  # The step changed the parameters, so the comparison is not between two copies of the init.
  init = init_params(config)
  assert not np.allclose(state1.params['head']['fc']['kernel'], init['head']['fc']['kernel'])


def init_params(config):
  model = models.get_model(config, 10)
  return state_lib.init_train_state(config, model, (8, 8, 1), jax.random.key(0)).params


@pytest.mark.parametrize('field,size', [('labeled_batch_size', 12), ('eval_batch_size', 4)])
def test_batch_sizes_must_divide_over_the_devices(field, size):
  mesh = parallel.make_mesh(conftest.cpu_devices(8))
  sizes = {'labeled_batch_size': 16, 'unlabeled_batch_size': 16, 'eval_batch_size': 32, field: size}
  with pytest.raises(ValueError, match=f'config.{field}={size} does not divide over the 8 devices'):
    parallel.check_batch_sizes(sizes, mesh, process_count=1)

