"""The run directory's config record and the resume policy.

A run directory belongs to one training run. Its first run writes
`config.json`; a later run resumes only under the policy below, checked
read-only (`check_config`) before anything is written, and recorded
(`record_config`) once every check has passed.

Resume policy, by config field:
  * FIXED_FIELDS define the labeled split, the data order, the model or the
    optimizer state's structure: they never change in a run directory.
  * FREE_FIELDS change nothing that is computed (cadence of logs, evaluations,
    checkpoints; where the data is read from; what the backward pass recomputes
    rather than keeps): they may always change.
  * `num_train_steps` is free with the 'step' schedule; with 'cosine' it sets
    the decay length, so it is one of the fields below.
  * Every other field (learning rate and schedule, loss weights, hypergradient
    settings, batch sizes, augmentation, ...) may change with
    `--config.allow_config_change=True`. Schedules are functions of the step,
    so a new schedule applies from the resumed step on as if the run had used it
    from step 0 (the rate jumps to the new curve's value; nothing is rescaled).

Each accepted change is recorded: the previous `config.json` is kept as
`config.<step>.json` (step = where the new config takes over).

A config saved by an earlier version is read in today's fields (`upgrade_saved`):
a renamed field under its new name (`RENAMED_FIELDS`), and a field of a method's
or option's block added since at its default (every such field is added with a
default that keeps the earlier behaviour).
"""

import json
import os
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections

from semimeta_jax import errors
from semimeta_jax import methods
from semimeta_jax import workdir_files

CONFIG_FILE = 'config.json'

# Earlier dotted field name -> today's, over the shared fields and every method's and option's.
RENAMED_FIELDS = {'data.folder_augment': 'data.augment_kind', **methods.renamed_fields()}

FIXED_FIELDS = frozenset({
    'seed', 'method', 'model', 'model_width',
    'data.name', 'data.num_labels', 'data.label_fraction', 'data.unlabeled_includes_labeled',
    'data.image_size', 'data.folder', 'data.train_split', 'data.test_split',
    'data.unlabeled_split', 'data.image_key', 'data.label_key', 'data.validation_size',
})
# Shared fields added since runs were recorded, at the value that keeps an earlier run's behaviour.
# No method read the strong view before `data.randaugment` came, so its defaults keep any earlier run.
ADDED_FIELDS = {
    'data.validation_size': 0,
    'data.randaugment.num_ops': 3, 'data.randaugment.magnitude': -1.0,
    'data.randaugment.max_magnitude': 30.0, 'data.randaugment.cutout': 0.5,
}
FREE_FIELDS = frozenset({
    'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
    'hypergrad.diagnostics_every_steps', 'hypergrad.loop_unroll', 'preemption_check_every_steps', 'allow_config_change',
    'max_steps_in_flight',
    'data.data_dir', 'data.download', 'data.source_dir', 'data.prefetch_batches', 'remat',
})


class ConfigChangedError(errors.UserError, ValueError):
  """The config differs from the one a run directory was started with."""


class WorkdirError(errors.UserError, ValueError):
  """The --workdir value cannot be used."""


def check_workdir_path(workdir) -> str:
  """`workdir` as a string; an empty one is refused (it would train into the current directory)."""
  workdir = '' if workdir is None else os.fsdecode(workdir)
  if not workdir.strip():
    raise WorkdirError('--workdir is empty: give the directory for this run, e.g. --workdir=runs/digits.')
  try:
    workdir.encode('utf-8')
  except UnicodeEncodeError:
    raise WorkdirError(f'--workdir={os.fsencode(workdir)!r} holds bytes that are not UTF-8 text: '
                       'give a workdir whose name is UTF-8.') from None
  return workdir


def check_run_length(workdir: str, start_step: int, num_train_steps: int):
  """Refuses to resume a run that is already past `num_train_steps`."""
  if start_step > num_train_steps:
    raise ConfigChangedError(
        f'{workdir} holds a run already at step {start_step}, past '
        f'config.num_train_steps={num_train_steps}. Pass --config.num_train_steps={start_step} '
        '(or more) to resume it, or use a new --workdir for a shorter run.')


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def upgrade_saved(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
  """A saved config (nested, as in config.json) in today's dotted field names.

  Renamed fields take their new names; the fields of method and option blocks
  that the saved config lacks (added since it was written) and `current` (the
  config compared with it) has take their defaults, as do the shared fields of
  `ADDED_FIELDS`; free fields added since take their current values (they never
  decide whether a run may resume).
  """
  flat = {RENAMED_FIELDS.get(name, name): value for name, value in _flatten(saved).items()}
  blocks = {name: block.to_dict() for name, block in methods.config_blocks().items()}
  current = _flatten(current)
  for name, value in _flatten(blocks).items():
    if name in current:
      flat.setdefault(name, value)
  for name in FREE_FIELDS & current.keys():
    flat.setdefault(name, current[name])
  for name in ADDED_FIELDS.keys() & current.keys():
    flat.setdefault(name, ADDED_FIELDS[name])
  return flat


def _free(name: str, saved: dict[str, Any], current: dict[str, Any]) -> bool:
  if name in FREE_FIELDS:
    return True
  # The step schedule ignores the run length; the cosine schedule decays over it.
  return (name == 'num_train_steps'
          and saved.get('lr_schedule') == current.get('lr_schedule') == 'step')


def config_differences(saved: dict[str, Any],
                       current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """Fields (dotted names) whose values differ, as {name: (saved, current)}.

  Free fields (see the module docstring) are ignored; a field present in only
  one of the two configs counts as different, with '<missing>' on the other side.
  """
  saved, current = _flatten(saved), _flatten(current)
  missing = '<missing>'
  return {
      name: (saved.get(name, missing), current.get(name, missing))
      for name in sorted(saved.keys() | current.keys())
      if not _free(name, saved, current)
      and saved.get(name, missing) != current.get(name, missing)
  }


def _listing(differences) -> str:
  return '; '.join(f'{name}: saved {old!r}, now {new!r}' for name, (old, new) in differences.items())


def check_config(workdir: str, config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
  """Checks `config` against the run directory's saved config; reads only.

  Args:
    workdir: the run directory (need not exist).
    config: this run's config; `config.allow_config_change` allows changes of
      fields that are neither fixed nor free.

  Returns:
    The differing fields, {name: (saved value, current value)}.

  Raises:
    ConfigChangedError: a fixed field differs, or another field differs and
      changes are not allowed.
  """
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return {}
  saved = workdir_files.read_json_object(
      path, fix='restore it from a config.<step>.json beside it, or use a new --workdir')
  current = json.loads(config.to_json_best_effort())
  differences = config_differences(upgrade_saved(saved, current), current)
  fixed = {k: v for k, v in differences.items() if k in FIXED_FIELDS}
  if fixed:
    raise ConfigChangedError(
        f'{workdir} was started with another {", ".join(fixed)} ({_listing(fixed)}): these '
        'fields define the split, the data order or the model and never change in a run '
        'directory. Restore them, or use a new --workdir.')
  if differences and not config.allow_config_change:
    raise ConfigChangedError(
        f'The config differs from the one saved in {path} ({_listing(differences)}). Restore '
        'those values, or add --config.allow_config_change=True to resume with the new ones '
        '(recorded in the workdir), or use a new --workdir.')
  if differences:
    logging.warning('Resuming %s with a changed config: %s', workdir, _listing(differences))
  return differences


def record_config(workdir: str, config: ml_collections.ConfigDict, step: int):
  """Writes `config` as the run directory's `config.json` (process 0 only).

  Call after `check_config` and every other check has passed. A different
  saved config (free fields included) is first kept as `config.<step>.json`
  (`config.<step>.<n>.json` if several changes take over at one step).

  Args:
    workdir: the run directory.
    config: this run's config.
    step: the step this config takes over from (the resumed step).
  """
  if jax.process_index() != 0:
    return
  workdir = epath.Path(workdir)
  path = workdir / CONFIG_FILE
  text = config.to_json_best_effort(sort_keys=True, indent=2)
  if path.exists():
    saved_text = workdir_files.read_text(path)
    if saved_text == text:
      return
    backup, n = workdir / f'config.{step}.json', 1
    while backup.exists():
      backup, n = workdir / f'config.{step}.{n}.json', n + 1
    workdir_files.write_new(backup, saved_text)
  workdir_files.make_dirs(workdir)
  # Other processes may read the file while it is written.
  workdir_files.write_atomically(path, text)
