"""Checkpoints of a `TrainState`: orbax save and restore, keep the last N, content checksums.

Each checkpoint step holds two orbax items: `state` (the array leaves) and
`checksums` (see `integrity.py`), written in the same save, so both appear at
the step's atomic commit or neither does. A restore checks the arrays read
against their checksums; `restore_newest_intact` sets a damaged checkpoint
aside as `checkpoints/corrupt.<step>` (never deleting it) and falls back to the
next newest one.
"""

import dataclasses
import os
import re
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from semimeta_jax import errors
from semimeta_jax import integrity
from semimeta_jax import state as state_lib
from semimeta_jax import workdir_files

_TMP_MARKER = '.orbax-checkpoint-tmp'
_CHECKPOINT_DIR = 'checkpoints'


class CheckpointSaveError(errors.UserError, OSError):
  """A checkpoint could not be written (e.g. the disk is full)."""


class CorruptCheckpointError(errors.UserError, RuntimeError):
  """A checkpoint's files are unreadable or do not match their checksums."""


class NoIntactCheckpointError(errors.UserError, RuntimeError):
  """Every checkpoint of a run directory is damaged."""


CheckpointMismatchError = integrity.CheckpointMismatchError


def _saved_fields(state: state_lib.TrainState) -> dict[str, Any]:
  """The pytree fields of `state` by name; static fields (apply_fn, tx) are left out."""
  return {
      f.name: getattr(state, f.name)
      for f in dataclasses.fields(state)
      if f.metadata.get('pytree_node', True)
  }


def _sync(name: str):
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'semimeta_jax:{name}')


def _remove_unfinished_saves(directory: epath.Path):
  """Deletes the temporary directories a run killed mid-write leaves behind.

  They are never valid checkpoints, and removing them keeps restores from
  tripping on them. Process 0 deletes; the others wait for it.
  """
  if jax.process_index() == 0 and directory.exists():
    if not directory.is_dir():
      raise workdir_files.WorkdirFileError(
          f'{directory} is not a directory (the run keeps its checkpoints there): remove or '
          'rename it, or use a new --workdir.')
    for path in directory.iterdir():
      if _TMP_MARKER in path.name:
        logging.warning('Removing the unfinished checkpoint %s.', path)
        if os.path.islink(path):
          os.unlink(path)  # The link alone: never what it points to.
        else:
          path.rmtree()
  _sync('remove_unfinished_saves')


# How TensorStore (orbax's array writer) reports the system's error inside a longer message.
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def _system_reason(error: BaseException) -> str | None:
  """The operating system's reason for `error` (e.g. 'No space left on device'), if it gave one.

  Orbax wraps the system's error in its own messages (a disk full is a ValueError
  that names every path first), so it is read from an OSError in the chain of
  causes or from TensorStore's `os_error_code` in any message of the chain.
  """
  chain = []
  while error is not None and error not in chain:
    chain.append(error)
    error = error.__cause__ or error.__context__
  for link in reversed(chain):
    if isinstance(link, OSError) and link.strerror:
      return link.strerror
  for link in reversed(chain):
    match = _OS_ERROR_CODE.search(str(link))
    if match:
      return os.strerror(int(match.group(1)))
  return None


class Checkpointer:
  """Saves and restores `TrainState`s under `<workdir>/checkpoints`, keeping the last N.

  The caller decides when to save. Saves are asynchronous: call `check_save`
  to learn whether the last one failed (it raises `CheckpointSaveError` naming
  that save's step); `save`, `wait_until_finished` and `close` check too.
  """

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True, read_only: bool = False):
    """Opens the checkpoint directory (created by the first save).

    Args:
      workdir: the run directory.
      keep: how many of the most recent checkpoints to keep.
      async_save: write in a background thread; `save` then returns once the
        arrays are copied off the devices, so training can go on.
      read_only: only restore (e.g. from a run that may still be training):
        neither create the directory nor remove another writer's unfinished save.
    """
    workdir = os.fspath(workdir)
    if '://' not in workdir:
      # Orbax's array writer refuses relative local paths (e.g. --workdir=runs/x).
      workdir = os.path.abspath(workdir)
    self.directory = epath.Path(workdir) / _CHECKPOINT_DIR
    self._read_only = read_only
    self._pending_step = None
    self._failed = False  # A failed save leaves its error in orbax, raised again by close().
    if not read_only:
      _remove_unfinished_saves(self.directory)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        # Done above, synchronously: orbax's own clean-up runs in a thread that
        # would race with whatever the caller does next.
        cleanup_tmp_directories=False,
        read_only=read_only,
        # The first save creates it: a run that fails its checks writes nothing.
        create=False,
        # Created in `save` itself: created in a background thread, a directory that cannot be
        # made (e.g. a link planted in its place) leaves orbax's writer threads waiting for its
        # signal for the coordination timeout (300 s), and the process cannot exit meanwhile.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
    # Named items: otherwise orbax infers the layout from the checkpoints it finds.
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=integrity.ITEM_NAMES)

  def save(self, step: int, state: state_lib.TrainState, *, force: bool = False) -> bool:
    """Starts saving `state` and its checksums as checkpoint `step`.

    Args:
      step: the step number to save under (normally `state.step`).
      state: the state to save; only its array leaves are written.
      force: replace an existing checkpoint of the same step instead of
        skipping the save.

    Returns:
      Whether a save was started.

    Raises:
      CheckpointSaveError: this save, or the previous one, failed.
    """
    step = int(step)
    self.check_save(block=True)
    latest = self._manager.latest_step()
    if step in self._manager.all_steps():
      if not force:
        logging.info('Checkpoint %d already exists; not saving it again.', step)
        return False
      self._manager.delete(step)
    elif latest is not None and step < latest:
      logging.warning(
          'Saving step %d below the latest checkpoint %d: a restart will resume '
          'from %d unless that checkpoint is removed.', step, latest, latest)
    fields = _saved_fields(state)
    # Computed here, before the next step overwrites the donated state.
    args = integrity.save_args(fields)
    self._pending_step = step
    try:
      # The caller owns the save cadence, so bypass the manager's own policy.
      return self._manager.save(step, args=args, force=True)
    except Exception as e:  # pylint: disable=broad-exception-caught
      self._raise_save_error(e)

  def check_save(self, *, block: bool = False):
    """Raises `CheckpointSaveError` if the last save failed.

    Args:
      block: wait for a save in progress; otherwise return at once while one is.
    """
    if self._pending_step is None or (not block and self._manager.is_saving_in_progress()):
      return
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-exception-caught
      self._raise_save_error(e)
    self._pending_step = None

  def _raise_save_error(self, error: BaseException):
    step, self._pending_step = self._pending_step, None
    self._failed = True
    self._manager.reload()
    latest = self._manager.latest_step()
    kept = (f'checkpoint {latest} is intact and a rerun of the same command resumes from it'
            if latest is not None else 'no earlier checkpoint exists; a rerun starts over')
    reason = _system_reason(error)
    raise CheckpointSaveError(
        f'Saving checkpoint {step} in {self.directory} failed: '
        + (f'{reason} ' if reason else '') + f'({integrity.root_cause(error)}); {kept} '
        'once the cause is fixed (e.g. disk space freed).') from error

  def latest_step(self) -> int | None:
    """The newest finished checkpoint's step (not yet verified), or None if there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """The steps of all finished checkpoints, in increasing order."""
    return sorted(self._manager.all_steps())

  def _abstract(self, target_state, step: int):
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        _saved_fields(target_state))
    # A field that an earlier TrainState had and saved empty (None) is read back as None
    # (orbax restores only a tree of the saved structure) and dropped by `_fields_of`.
    try:
      saved = dict(ocp.StandardCheckpointHandler().metadata(
          self.directory / str(step) / integrity.STATE))
    except Exception:  # pylint: disable=broad-exception-caught
      saved = {}  # Unreadable metadata: the restore below reports the checkpoint's problem.
    for name, value in saved.items():
      if value is None and name not in abstract:
        abstract[name] = None
    return abstract

  @staticmethod
  def _fields_of(target_state, restored):
    """The restored values of `target_state`'s own fields (retired empty ones dropped)."""
    names = _saved_fields(target_state).keys()
    return {name: value for name, value in restored.items() if name in names}

  def restore(self, target_state: state_lib.TrainState, step: int | None = None
             ) -> state_lib.TrainState:
    """Restores and verifies a checkpoint into the structure and shardings of `target_state`.

    Arrays land on the devices and with the shardings of the matching leaves of
    `target_state` (e.g. replicated over a mesh, in every process); the static
    fields (`apply_fn`, `tx`) are taken from `target_state`.

    Args:
      target_state: a state with the same structure as the saved one, e.g. a
        freshly initialised state placed on the mesh.
      step: which checkpoint; None means the latest.

    Returns:
      `target_state` with every saved field replaced by the checkpoint's values.

    Raises:
      FileNotFoundError: if there is no such checkpoint.
      CorruptCheckpointError: if it is unreadable or fails its checksums.
      CheckpointMismatchError: if it holds a state of another structure.
    """
    if step is None:
      step = self._manager.latest_step()
    if step is None or step not in self._manager.all_steps():
      raise FileNotFoundError(f'No checkpoint {step} in {self.directory}.')
    restored, problem = integrity.read_verified(self._manager, step, self._abstract(target_state, step))
    problem = integrity.agreed(problem)
    if problem:
      raise CorruptCheckpointError(f'Checkpoint {step} in {self.directory}: {problem}.')
    logging.info('Restored checkpoint %d from %s (checksums verified).', step, self.directory)
    return target_state.replace(**self._fields_of(target_state, restored))

  def restore_newest_intact(self, target_state: state_lib.TrainState
                            ) -> tuple[state_lib.TrainState, int | None]:
    """Restores the newest checkpoint that passes its checks, setting damaged ones aside.

    Args:
      target_state: as for `restore`.

    Returns:
      (restored state, its step), or (`target_state`, None) if there is no
      checkpoint at all.

    Raises:
      NoIntactCheckpointError: checkpoints exist but every one is damaged
        (all are then set aside, so a rerun starts over from step 0).
      CheckpointMismatchError: the config builds a state of another structure.
    """
    damaged = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      restored, problem = integrity.read_verified(self._manager, step, self._abstract(target_state, step))
      problem = integrity.agreed(problem)
      if problem is None:
        logging.info('Restored checkpoint %d from %s (checksums verified).', step, self.directory)
        return target_state.replace(**self._fields_of(target_state, restored)), step
      aside = self._set_aside(step)
      logging.error('Checkpoint %d is %s; moved it to %s and trying an older one.',
                    step, problem if problem.startswith('damaged') else f'unusable: {problem}', aside)
      damaged.append(f'{step} ({problem})')
    if damaged:
      raise NoIntactCheckpointError(
          f'No intact checkpoint in {self.directory}: {"; ".join(damaged)}. They were moved '
          'aside as corrupt.<step> (nothing deleted); rerunning the same command starts this '
          'run over from step 0, or use a new --workdir.')
    return target_state, None

  def newest_intact_step(self, target_state: state_lib.TrainState) -> int | None:
    """The step of the newest checkpoint that passes its checks (damaged ones are set aside)."""
    try:
      return self.restore_newest_intact(target_state)[1]
    except NoIntactCheckpointError as e:
      logging.error('%s', e)
      return None

  def _set_aside(self, step: int) -> epath.Path:
    """Renames checkpoint `step` to `corrupt.<step>[.n]`, which orbax does not list as a step."""
    aside, n = self.directory / f'corrupt.{step}', 1
    while aside.exists():
      aside, n = self.directory / f'corrupt.{step}.{n}', n + 1
    if jax.process_index() == 0 and not self._read_only:
      (self.directory / str(step)).rename(aside)
    _sync(f'set_aside_{step}')
    self._manager.reload()
    return aside

  def wait_until_finished(self):
    """Blocks until every pending asynchronous save has been written; raises if one failed."""
    self.check_save(block=True)

  def close(self):
    """Waits for pending saves and releases the manager's resources."""
    try:
      self.check_save(block=True)
    finally:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-exception-caught
        if not self._failed:  # Otherwise already raised as a CheckpointSaveError.
          raise

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()
