"""Content checksums of a checkpoint's arrays, written with it and checked on restore.

Orbax and TensorStore check no array content: the zarr3 layout that orbax
writes protects only the shard index with a crc32c codec (orbax
`serialization/tensorstore_utils.py`), so bytes overwritten inside a data file
restore silently as other numbers. A checkpoint therefore carries a record of
every array leaf, {path: {'sha256', 'shape', 'dtype'}}, computed on the host
from the arrays being saved; a restore recomputes it from what was read.
"""

import hashlib
from typing import Any

import jax
import numpy as np

Record = dict[str, dict[str, Any]]


def _host_value(leaf) -> np.ndarray:
  """The full value of a leaf as a host array, in any process.

  The training state is replicated: every process holds a full copy, so the
  first local shard is the whole array even when the array spans processes.
  """
  if isinstance(leaf, jax.Array):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    if not leaf.is_fully_addressable:
      if not leaf.is_fully_replicated:
        raise ValueError('Checksums need replicated arrays; got a sharded one.')
      leaf = leaf.addressable_shards[0].data
  return np.asarray(leaf)


def _paths_and_leaves(tree) -> list[tuple[str, Any]]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(jax.tree_util.keystr(path, simple=True, separator='/'), leaf) for path, leaf in leaves]


def checksums(tree) -> Record:
  """The record of every array leaf of `tree` (one host copy of each)."""
  record = {}
  for path, leaf in _paths_and_leaves(tree):
    value = _host_value(leaf)
    record[path] = {'sha256': hashlib.sha256(value.tobytes()).hexdigest(),
                    'shape': list(value.shape), 'dtype': str(value.dtype)}
  return record


def structure_difference(record: Record, target) -> str | None:
  """How `target`'s leaves (paths, shapes) differ from those `record` describes; None if alike.

  A difference means the config builds another state than the one saved (a
  model or optimizer change), which is not damage: the checkpoint is fine.
  """
  def shape_of(leaf):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return list(jax.eval_shape(jax.random.key_data, leaf).shape)
    return list(leaf.shape)

  wanted = {path: shape_of(leaf) for path, leaf in _paths_and_leaves(target)}
  saved = {path: entry['shape'] for path, entry in record.items()}
  only_saved = sorted(saved.keys() - wanted.keys())
  only_wanted = sorted(wanted.keys() - saved.keys())
  if only_saved or only_wanted:
    return (f'saved leaves not in this config\'s state: {only_saved[:3]}; '
            f'leaves of this state not saved: {only_wanted[:3]}')
  reshaped = [p for p in sorted(saved) if saved[p] != wanted[p]]
  if reshaped:
    p = reshaped[0]
    return f'{p} has shape {saved[p]} in the checkpoint but {wanted[p]} in this config'
  return None


def first_mismatch(record: Record, tree) -> str | None:
  """What differs between the `record` and the arrays of `tree`, or None if they match."""
  actual = checksums(tree)
  for path in sorted(record.keys() | actual.keys()):
    if path not in actual or path not in record:
      return f'leaf {path} is missing from the {"restored arrays" if path in record else "record"}'
    if record[path] != actual[path]:
      return f'{path} does not match its checksum'
  return None
