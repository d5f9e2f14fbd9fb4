"""Content checksums of a checkpoint's arrays, written with it and checked when it is read.

Orbax and TensorStore check no array content: the zarr3 layout that orbax
writes protects only the shard index with a crc32c codec (orbax
`serialization/tensorstore_utils.py`), so bytes overwritten inside a data file
restore silently as other numbers. A checkpoint therefore carries a record of
every array leaf, {path: {'sha256', 'shape', 'dtype'}}, computed on the host
from the arrays being saved; a restore recomputes it from what was read.
"""

import hashlib
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from semimeta_jax import errors

Record = dict[str, dict[str, Any]]
# The orbax items of a checkpoint step, and the single item of those written before checksums.
STATE, CHECKSUMS = 'state', 'checksums'
ITEM_NAMES = (STATE, CHECKSUMS)
_LEGACY_ITEM = 'default'


class CheckpointMismatchError(errors.UserError, ValueError):
  """The config builds a state of another structure than the checkpoint holds."""


def root_cause(error: BaseException) -> str:
  """The innermost cause of `error`, on one line (library errors span many)."""
  seen = []
  while error is not None and error not in seen:
    seen.append(error)
    error = error.__cause__ or error.__context__
  root = next((e for e in reversed(seen) if isinstance(e, OSError) and e.strerror), seen[-1])
  text = ' '.join(str(root).split()) or type(root).__name__
  return f'{type(root).__name__}: {text[:300]}'


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


def save_args(fields) -> ocp.args.Composite:
  """The orbax arguments that save `fields` with their checksums, in one atomic step."""
  return ocp.args.Composite(**{STATE: ocp.args.StandardSave(fields),
                               CHECKSUMS: ocp.args.JsonSave(checksums(fields))})


def _restore_item(manager, step, name, args):
  return manager.restore(step, args=ocp.args.Composite(**{name: args}))[name]


def read_verified(manager: ocp.CheckpointManager, step: int, abstract) -> tuple[Any, str | None]:
  """Reads checkpoint `step` of `manager` into `abstract` and checks it.

  Returns:
    (restored fields, None), or (None, what is wrong with the checkpoint).

  Raises:
    CheckpointMismatchError: the checkpoint is fine but holds another structure.
  """
  step_dir = manager.directory / str(step)
  if not (step_dir / CHECKSUMS).exists() and (step_dir / _LEGACY_ITEM).exists():
    logging.warning('Checkpoint %d has no checksums (an older layout); restoring it unchecked.', step)
    try:
      with ocp.CheckpointManager(manager.directory, options=ocp.CheckpointManagerOptions(
          read_only=True, create=False)) as legacy:
        return legacy.restore(step, args=ocp.args.StandardRestore(abstract)), None
    except Exception as e:  # pylint: disable=broad-exception-caught
      return None, f'its arrays are unreadable ({root_cause(e)})'
  try:
    record = _restore_item(manager, step, CHECKSUMS, ocp.args.JsonRestore())
    if not isinstance(record, dict) or not record:
      raise ValueError('the checksum record is empty')
  except Exception as e:  # pylint: disable=broad-exception-caught
    return None, f'its checksum record is unreadable ({root_cause(e)})'
  difference = structure_difference(record, abstract)
  if difference:
    raise CheckpointMismatchError(
        f'Checkpoint {step} in {manager.directory} holds another state than this config builds '
        f'({difference}): the model or optimizer config changed. Restore the config the run '
        'was started with, or use a new --workdir.')
  try:
    restored = _restore_item(manager, step, STATE, ocp.args.StandardRestore(abstract))
  except Exception as e:  # pylint: disable=broad-exception-caught
    return None, f'its arrays are unreadable ({root_cause(e)})'
  mismatch = first_mismatch(record, restored)
  return (None, f'damaged: {mismatch}') if mismatch else (restored, None)


def agreed(problem: str | None) -> str | None:
  """One verdict for every process: damaged if any process read it damaged."""
  if jax.process_count() == 1:
    return problem
  flags = multihost_utils.process_allgather(np.int32(problem is not None))
  if problem is None and np.max(flags):
    return 'damaged as read by another process'
  return problem
