"""Shared test fixtures: a tiny configuration and synthetic batches."""

import os
import tempfile

# The tests compile many small programs once each: XLA's CPU optimisation passes
# cost more compile time than they save at these sizes (the multi-process test
# measured 20 s -> 4-9 s per step compile). Set before the backend starts.
# On a GPU, XLA may reduce with atomics in an order that changes between two
# runs of one program; tests that compare two runs bit for bit need it fixed.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0'
                           ' --xla_gpu_deterministic_ops=true').strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

# Eight simulated CPU devices for the multi-device tests; set before any test
# starts the backend. Single-device tests use a one-device mesh or plain jit.
jax.config.update('jax_num_cpu_devices', 8)

# Compiled programs persist between test runs, so a rerun after a one-line change
# compiles only what the change touched; tests that build the same program share it.
# SEMIMETA_TEST_XLA_CACHE='' turns it off.
_XLA_CACHE = os.environ.get('SEMIMETA_TEST_XLA_CACHE',
                            os.path.join(tempfile.gettempdir(), 'semimeta_jax_test_xla_cache'))
if _XLA_CACHE:
  jax.config.update('jax_compilation_cache_dir', _XLA_CACHE)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.1)

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


def cpu_devices(count: int):
  """`count` of the simulated CPU devices, also on a machine whose default backend is a GPU.

  The multi-device tests check the logic of a mesh (shardings, collectives,
  equality to one device); a one-GPU machine still has the eight CPU devices.
  """
  devices = jax.devices('cpu')[:count]
  assert len(devices) == count, f'need {count} CPU devices, have {jax.devices("cpu")}'
  return devices

from configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position


def tiny_config(**overrides):
  """The default config shrunk to a 4-channel ConvLarge on 8x8 inputs."""
  config = default.get_config()
  config.model = 'convlarge_digits'
  config.model_width = 4
  config.labeled_batch_size = 16
  config.unlabeled_batch_size = 16
  config.eval_batch_size = 32
  config.warmup_steps = 0
  config.consistency_rampup_steps = 0
  config.learning_rate = 0.05
  config.lr_decay_boundaries = ()
  from semimeta_jax import run_dir  # pylint: disable=g-import-not-at-top
  for name, value in overrides.items():
    # A field's earlier flat name (e.g. vat_epsilon) is read as today's, as a saved config is.
    name = run_dir.RENAMED_FIELDS.get(name, name)
    target = config
    *parents, leaf = name.split('.')
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def synthetic_batch(key, batch_size=16, image_shape=(8, 8, 1), num_classes=10):
  """A labeled + unlabeled batch in the training loop's layout."""
  keys = jax.random.split(key, 4)
  # Train-split indices: the labeled examples first, then the unlabeled ones.
  part = lambda k1, k2, first: {'image': jax.random.normal(k1, (batch_size, *image_shape)),
                                'label': jax.random.randint(k2, (batch_size,), 0, num_classes),
                                'index': first + jnp.arange(batch_size, dtype=jnp.int32)}
  return {'labeled': part(keys[0], keys[1], 0), 'unlabeled': part(keys[2], keys[3], batch_size)}


@pytest.fixture
def make_config():
  return tiny_config
