"""TNAR-VAE in the training loop: a missing or mismatched VAE, a VAE trained then used, resume, 8 devices."""

import functools

import chex
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from semimeta_jax import checkpoint
from semimeta_jax import errors
from semimeta_jax import parallel
from semimeta_jax import vae_main
from semimeta_jax.models import vae as vae_lib
from tests import conftest
from tests.conftest import synthetic_batch, tiny_config
from tests.test_parallel import one_step
from tests.test_train import mock_config
from tests.test_train import run
from tests.test_train_methods import saved_state

TINY_VAE = {'vae.architecture': 'mlp', 'vae.latent_dim': 4, 'vae.width': 8, 'vae.batch_size': 8,
            'vae.num_train_steps': 3}


def write_untrained_vae(directory, config, image_shape, **description_changes):
  """A VAE directory as `vae_main` leaves it, without the training: a step-0 checkpoint and vae.json."""
  state = vae_lib.init_train_state(config.vae, image_shape, jax.random.key(0))
  with checkpoint.Checkpointer(str(directory), keep=1, async_save=False) as checkpointer:
    checkpointer.save(0, state)
  description = {**vae_lib.describe(config, image_shape, config.data.name, 0), **description_changes}
  vae_lib.write_description(str(directory), description)
  return str(directory)


def tnar_config(tmp_path, vae_dir, **overrides):
  return mock_config(tmp_path, method='tnar_vae', **{'tnar.vae_dir': vae_dir, 'tnar.xi': 0.0,
                                                     **TINY_VAE, **overrides})


@pytest.mark.parametrize('case,message', [
    ('unset', "config.tnar.vae_dir='': TNAR needs a trained VAE"),
    ('absent', 'holds no trained VAE'),
    ('latent_dim', 'config.vae.latent_dim=4: the VAE in .* has latent_dim=6'),
    ('dataset', "holds a VAE of dataset 'digits', not 'cifar10'"),
    ('image_shape', r"holds a VAE of \[8, 8, 1\] images; this run's are \[32, 32, 3\]"),
    ('no_checkpoint', 'its VAE checkpoint cannot be read'),
])
def test_a_missing_or_mismatched_vae_is_one_error_before_anything_is_written(tmp_path, case, message):
  vae_dir = tmp_path / 'vae'
  reference = tnar_config(tmp_path, '')
  if case in ('latent_dim', 'dataset', 'image_shape'):
    shape = (8, 8, 1) if case == 'image_shape' else (32, 32, 3)
    changes = {'latent_dim': {'latent_dim': 6}, 'dataset': {'dataset': 'digits'}}.get(case, {})
    write_untrained_vae(vae_dir, reference, shape, **changes)
  elif case == 'no_checkpoint':
    write_untrained_vae(vae_dir, reference, (32, 32, 3))
    for saved in (vae_dir / 'checkpoints').iterdir():
      for path in sorted(saved.rglob('*'), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
      saved.rmdir()
  config = tnar_config(tmp_path, '' if case == 'unset' else str(vae_dir))
  with pytest.raises(errors.ConfigError, match=message):
    run(config, tmp_path / 'run')
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_a_vae_trained_by_vae_main_drives_a_run_that_resumes_to_the_same_state(tmp_path):
  vae_config = tnar_config(tmp_path, '')
  with tfds.testing.mock_data(num_examples=40):
    description = vae_main.train_vae(vae_config, str(tmp_path / 'vae'))
  assert description['image_shape'] == [32, 32, 3] and description['steps'] == 3
  rows = (tmp_path / 'vae' / 'metrics.jsonl').read_text().splitlines()
  assert rows and 'vae/negative_elbo' in rows[-1]
  with pytest.raises(errors.ConfigError, match='config.vae.num_train_steps=2: .* already trained 3 steps'):
    with tfds.testing.mock_data(num_examples=40):
      vae_main.train_vae(tnar_config(tmp_path, '', **{'vae.num_train_steps': 2}), str(tmp_path / 'vae'))

  config = tnar_config(tmp_path, str(tmp_path / 'vae'))
  whole = run(config, tmp_path / 'whole')
  assert whole['completed'] and 0.0 <= whole['final_error_top1'] <= 100.0
  run(tnar_config(tmp_path, str(tmp_path / 'vae'), num_train_steps=3), tmp_path / 'resumed')
  run(config, tmp_path / 'resumed')
  state_whole = saved_state(config, tmp_path / 'whole')
  state_resumed = saved_state(config, tmp_path / 'resumed')
  chex.assert_trees_all_equal(state_resumed.params, state_whole.params)
  # The VAE rode along frozen: the run's copy is the trained one, bit for bit.
  with checkpoint.Checkpointer(str(tmp_path / 'vae'), keep=1, read_only=True) as checkpointer:
    abstract = jax.eval_shape(functools.partial(vae_lib.init_train_state, vae_config.vae, (32, 32, 3)),
                              jax.random.key(0))
    trained = checkpointer.restore(jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.replicated(parallel.make_mesh())),
        abstract)).params
  chex.assert_trees_all_equal(jax.device_get(state_whole.extra['vae']), jax.device_get(trained))


@pytest.mark.slow
def test_eight_devices_match_one(tmp_path):
  # CG truncated below the code's dimension, as the authors' 4 steps in 512 dimensions: run to
  # the dimension (4 of 4), it solves J^T J exactly, and an untrained decoder's J^T J is so
  # ill-conditioned that the float32 rounding of a reduction order moves the solution by 1e-3.
  fields = {'tnar.xi': 0.0, **TINY_VAE, 'vae.latent_dim': 16, 'tnar.cg_iterations': 4}
  config = tiny_config(method='tnar_vae', **fields)
  write_untrained_vae(tmp_path / 'vae', config, (8, 8, 1))
  config = tiny_config(method='tnar_vae', **{'tnar.vae_dir': str(tmp_path / 'vae'), **fields})
  batch = jax.tree.map(np.asarray, synthetic_batch(jax.random.key(1)))
  state8, metrics8 = one_step(config, parallel.make_mesh(conftest.cpu_devices(8)), batch)
  state1, metrics1 = one_step(config, parallel.make_mesh(conftest.cpu_devices(1)), batch)
  chex.assert_trees_all_close(state8.params, state1.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state8.batch_stats, state1.batch_stats, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(metrics8, metrics1, rtol=1e-4, atol=1e-6)
  assert float(metrics1['tangent_loss']) > 0 and float(metrics1['normal_loss']) > 0
