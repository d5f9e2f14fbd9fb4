"""Checkpoints, preemption handling and run-directory protection.

`Checkpointer` saves and restores the array leaves of a `TrainState` with orbax,
`PreemptionGuard` turns SIGTERM into a clean stop that every process agrees on,
and `check_workdir_config` keeps a resumed run from silently mixing two configs.
"""

import dataclasses
import json
import os
import signal
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from semimeta_jax import errors
from semimeta_jax import state as state_lib

# Config fields that may change when a run is resumed without changing what it
# computes: run length, logging/evaluation/checkpoint cadence and data location.
RESUMABLE_FIELDS = frozenset({
    'num_train_steps',
    'log_every_steps',
    'eval_every_steps',
    'checkpoint_every_steps',
    'keep_checkpoints',
    'hypergrad_diagnostics_every_steps',
    'allow_config_change',
    'data.data_dir',
    'data.download',
    'data.prefetch_batches',
})

_TMP_MARKER = '.orbax-checkpoint-tmp'
_CHECKPOINT_DIR = 'checkpoints'
_CONFIG_FILE = 'config.json'


def _saved_fields(state: state_lib.TrainState) -> dict[str, Any]:
  """The pytree fields of `state` by name; static fields (apply_fn, tx) are left out."""
  return {
      f.name: getattr(state, f.name)
      for f in dataclasses.fields(state)
      if f.metadata.get('pytree_node', True)
  }


def _remove_unfinished_saves(directory: epath.Path):
  """Deletes the temporary directories a run killed mid-write leaves behind.

  They are never valid checkpoints, and removing them keeps restores from
  tripping on them. Process 0 deletes; the others wait for it.
  """
  if jax.process_index() == 0 and directory.exists():
    for path in directory.iterdir():
      if _TMP_MARKER in path.name:
        logging.warning('Removing the unfinished checkpoint %s.', path)
        path.rmtree()
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('semimeta_jax:remove_unfinished_saves')


class Checkpointer:
  """Saves and restores `TrainState`s under `<workdir>/checkpoints`, keeping the last N.

  The caller decides when to save (every `checkpoint_every_steps`, on preemption,
  at the end); `save` writes whenever it is called.
  """

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True, read_only: bool = False):
    """Opens (or creates) the checkpoint directory.

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
    if not read_only:
      _remove_unfinished_saves(self.directory)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        # Done above, synchronously: orbax's own clean-up runs in a thread that
        # would race with whatever the caller does next.
        cleanup_tmp_directories=False,
        read_only=read_only,
        create=not read_only)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state: state_lib.TrainState, *, force: bool = False) -> bool:
    """Starts saving `state` as checkpoint `step`.

    Args:
      step: the step number to save under (normally `state.step`).
      state: the state to save; only its array leaves are written.
      force: replace an existing checkpoint of the same step instead of
        skipping the save.

    Returns:
      Whether a save was started.
    """
    step = int(step)
    latest = self._manager.latest_step()
    if step in self._manager.all_steps():
      if not force:
        logging.info('Checkpoint %d already exists; not saving it again.', step)
        return False
      self._manager.wait_until_finished()
      self._manager.delete(step)
    elif latest is not None and step < latest:
      logging.warning(
          'Saving step %d below the latest checkpoint %d: a restart will resume '
          'from %d unless that checkpoint is removed.', step, latest, latest)
    # The caller owns the save cadence, so bypass the manager's own policy.
    return self._manager.save(
        step, args=ocp.args.StandardSave(_saved_fields(state)), force=True)

  def latest_step(self) -> int | None:
    """The newest finished checkpoint's step, or None if there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """The steps of all finished checkpoints, in increasing order."""
    return sorted(self._manager.all_steps())

  def restore(self, target_state: state_lib.TrainState, step: int | None = None
             ) -> state_lib.TrainState:
    """Restores a checkpoint into the structure and shardings of `target_state`.

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
    """
    if step is None:
      step = self._manager.latest_step()
    if step is None or step not in self._manager.all_steps():
      raise FileNotFoundError(f'No checkpoint {step} in {self.directory}.')
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        _saved_fields(target_state))
    restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    logging.info('Restored checkpoint %d from %s.', step, self.directory)
    return target_state.replace(**restored)

  def wait_until_finished(self):
    """Blocks until every pending asynchronous save has been written."""
    self._manager.wait_until_finished()

  def close(self):
    """Waits for pending saves and releases the manager's resources."""
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()


def _jax_preemption_service_available() -> bool:
  """Whether JAX's distributed runtime is up and watching for preemption notices."""
  # `jax.distributed.initialize` starts the service unless this flag is off.
  return (jax.distributed.is_initialized()
          and bool(jax.config.jax_enable_preemption_service))


class PreemptionGuard:
  """Tells the training loop, after each step, whether to save and stop.

  Single process: a SIGTERM handler sets a flag. Several processes: with JAX's
  distributed runtime, its preemption service already catches SIGTERM and picks
  a step at which all processes stop together
  (`multihost_utils.reached_preemption_sync_point`); our handler is then not
  installed, since it would replace the runtime's. Without that service, the
  local flags are combined across processes every `sync_every_steps` steps.

  Every process must call `should_stop` at every step, with the same steps.
  Create the guard in the main thread (Python only installs signal handlers there).
  """

  def __init__(self, *, signals=(signal.SIGTERM,), sync_every_steps: int = 1):
    """Installs the handlers.

    Args:
      signals: the signals that ask for a clean stop.
      sync_every_steps: with several processes and no JAX preemption service,
        how often the processes compare their flags (one small all-gather).
    """
    self._sync_every_steps = max(1, sync_every_steps)
    self._received = False
    self._logged = False
    self._previous_handlers = {}
    self._use_jax_service = _jax_preemption_service_available()
    if not self._use_jax_service:
      for sig in signals:
        self._previous_handlers[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del signum, frame  # Unused.
    # Only set a flag: logging here could deadlock on a lock the interrupted
    # code holds.
    self._received = True

  @property
  def signal_received(self) -> bool:
    """Whether this process received one of the signals (not agreed across processes)."""
    return self._received

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after `step`; the same answer in every process."""
    if self._use_jax_service:
      stop = multihost_utils.reached_preemption_sync_point(int(step))
    elif jax.process_count() == 1:
      stop = self._received
    elif int(step) % self._sync_every_steps:
      stop = False
    else:
      flags = multihost_utils.process_allgather(np.int32(self._received))
      stop = bool(np.max(flags))
    if stop and not self._logged:
      logging.warning('Preemption requested: stopping after step %d.', step)
      self._logged = True
    return stop

  def close(self):
    """Puts back the signal handlers that were in place before."""
    for sig, previous in self._previous_handlers.items():
      # None means the old handler was not installed from Python and cannot be
      # reinstated; the default action is the closest match.
      signal.signal(sig, signal.SIG_DFL if previous is None else previous)
    self._previous_handlers = {}

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()


class ConfigChangedError(errors.UserError, ValueError):
  """The config differs from the one a run directory was started with."""


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def config_differences(saved: dict[str, Any],
                       current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """Fields (dotted names) whose values differ, as {name: (saved, current)}.

  Fields in `RESUMABLE_FIELDS` are ignored; a field present in only one of the
  two configs counts as different, with '<missing>' on the other side.
  """
  saved, current = _flatten(saved), _flatten(current)
  missing = '<missing>'
  return {
      name: (saved.get(name, missing), current.get(name, missing))
      for name in sorted(saved.keys() | current.keys())
      if name not in RESUMABLE_FIELDS
      and saved.get(name, missing) != current.get(name, missing)
  }


def _write_json_atomically(path: epath.Path, text: str):
  # Other processes may read the file while it is written; rename is atomic.
  tmp = path.parent / f'{path.name}.tmp'
  tmp.write_text(text)
  tmp.replace(path)


def check_workdir_config(workdir: str, config: ml_collections.ConfigDict, *,
                         allow_change: bool) -> dict[str, tuple[Any, Any]]:
  """Refuses to resume a run directory with a different config.

  The first run writes `<workdir>/config.json`. A later run compares its config
  with it, ignoring `RESUMABLE_FIELDS`; if they differ and `allow_change` is
  False it raises and writes nothing. Otherwise, if the file differs at all
  (resumable fields included), the old file is kept as `config.<n>.json` and the
  current config becomes `config.json`, so that file always describes the latest
  run and no earlier config is lost. Only process 0 writes.

  Args:
    workdir: the run directory.
    config: this run's config.
    allow_change: resume even if the config differs.

  Returns:
    The differing fields, {name: (saved value, current value)}.

  Raises:
    ConfigChangedError: if the configs differ and `allow_change` is False.
  """
  workdir = epath.Path(workdir)
  path = workdir / _CONFIG_FILE
  current_text = config.to_json_best_effort(sort_keys=True, indent=2)
  current = json.loads(current_text)
  differences = {}
  saved = None
  if path.exists():
    saved = json.loads(path.read_text())
    differences = config_differences(saved, current)
    if differences:
      listing = '\n'.join(f'  {name}: saved {old!r}, now {new!r}'
                          for name, (old, new) in differences.items())
      if not allow_change:
        raise ConfigChangedError(
            f'The config differs from the one saved in {path}:\n{listing}\n'
            'Pass --config.allow_config_change=True to resume with the new '
            'config anyway, or use a new --workdir.')
      logging.warning('Resuming %s with a changed config:\n%s', workdir, listing)
  if saved == current or jax.process_index() != 0:
    return differences
  workdir.mkdir(parents=True, exist_ok=True)
  if saved is not None:
    n = 1
    while (workdir / f'config.{n}.json').exists():
      n += 1
    (workdir / f'config.{n}.json').write_text(path.read_text())
  _write_json_atomically(path, current_text)
  return differences
