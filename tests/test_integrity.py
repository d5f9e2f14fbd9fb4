"""Checkpoint checksums: every stored array is covered, and damage to any one of them is named."""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semimeta_jax import checkpoint
from semimeta_jax import integrity
from semimeta_jax import methods
from tests.conftest import tiny_config
from tests.tiny_net import TinyNet


def _saved_fields():
  """What a checkpoint stores, for a state with every optional part (EMA, fast-SWA, extra) on."""
  config = tiny_config(**{'ema.decay': 0.9, 'fast_swa.cycles': 1, 'fast_swa.cycle_steps': 2,
                           'fast_swa.average_every_steps': 1, 'fast_swa.lr_max': 0.1,
                           'fast_swa.lr_min': 0.01, 'fast_swa.bn_update_batches': 1})
  state = methods.init_train_state(config, TinyNet(), (4, 4, 1), jax.random.key(0))
  assert {'ema', 'fast_swa'} <= set(state.extra)
  state = state.replace(extra={**state.extra, 'ensemble': jnp.arange(12.0).reshape(4, 3),
                               'visits': jnp.arange(4, dtype=jnp.int32)})
  return checkpoint._saved_fields(state)  # pylint: disable=protected-access


def _leaves(tree):
  """(path, host array) of every leaf, keys as raw bytes, flattened independently of the module."""
  found = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    found.append((jax.tree_util.keystr(path, simple=True, separator='/'), np.asarray(leaf)))
  return found


FIELDS = _saved_fields()
LEAF_PATHS = [path for path, _ in _leaves(FIELDS)]


def test_the_record_holds_every_array_with_its_hash_shape_and_dtype():
  record = integrity.checksums(FIELDS)
  leaves = _leaves(FIELDS)
  assert len(leaves) > 20  # params, stats, optimizer, EMA, fast-SWA, extra, key, step.
  assert sorted(record) == sorted(path for path, _ in leaves)
  for path, value in leaves:
    assert record[path] == {'sha256': hashlib.sha256(value.tobytes()).hexdigest(),
                            'shape': list(value.shape), 'dtype': str(value.dtype)}, path


def _damaged(tree, target_path, how):
  """`tree` with the leaf at `target_path` changed by `how`; every other leaf untouched."""
  def change(path, leaf):
    if jax.tree_util.keystr(path, simple=True, separator='/') != target_path:
      return leaf
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return jax.random.key(12345)  # Another key: the stored key data changed.
    value = np.array(leaf)
    if how == 'one_element':
      value.reshape(-1)[value.size // 2] += 1
      return value
    if how == 'dtype':
      return value.astype(np.float64 if value.dtype != np.float64 else np.float32)  # Same numbers.
    raise ValueError(how)
  return jax.tree_util.tree_map_with_path(change, tree)


@pytest.mark.parametrize('how', ['one_element', 'dtype'])
def test_damage_to_each_stored_array_in_turn_is_named(how):
  record = integrity.checksums(FIELDS)
  assert integrity.first_mismatch(record, FIELDS) is None
  for path in LEAF_PATHS:
    problem = integrity.first_mismatch(record, _damaged(FIELDS, path, how))
    assert problem == f'{path} does not match its checksum', (path, problem)


def test_a_missing_or_extra_array_is_named():
  record = integrity.checksums(FIELDS)
  for path in (LEAF_PATHS[0], LEAF_PATHS[len(LEAF_PATHS) // 2], LEAF_PATHS[-1]):
    fewer = {p: entry for p, entry in record.items() if p != path}
    assert integrity.first_mismatch(fewer, FIELDS) == f'leaf {path} is missing from the record'
    assert integrity.first_mismatch(record, dict(FIELDS, more=jnp.zeros(2))) == (
        'leaf more is missing from the record')
