"""The command line's contract with the user: help, one-line errors, the run plan, the outcome.

A mistake the user can fix (a flag, a config field, a config file, a workdir, a
dataset) is one line on stderr, `error: ...`, and exit code 2, before anything
is written; a traceback means a bug.
"""

import contextlib
import difflib
import errno
import importlib.util
import logging as std_logging
import os
import sys
import traceback
from typing import Any, Sequence

from absl import flags
from absl import logging

from semimeta_jax import errors
from semimeta_jax import library_log

USAGE_ERROR_EXIT_CODE = 2
_HELP_FLAGS = ('-h', '--help', '-help', '--helpshort', '--helpfull', '-?')


# Conditions of the machine, not bugs: a write that fails with one of these is
# the user's to fix (free space, quota, permissions), so it gets one line too.
_ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def fail(message: str):
  """Prints `error: message` on stderr and exits with code 2."""
  with library_log.to_terminal():
    print(f'error: {message}', file=sys.stderr)
  sys.exit(USAGE_ERROR_EXIT_CODE)


@contextlib.contextmanager
def user_errors_exit():
  """Turns a `UserError` (or a full / read-only disk) raised inside the block into `fail(message)`."""
  try:
    yield
  except errors.UserError as e:
    fail(str(e))
  except OSError as e:
    if e.errno not in _ENVIRONMENT_ERRNOS:
      raise
    traceback.print_exc()  # Into the workdir's library.log once the workdir exists.
    where = f' writing {e.filename}' if e.filename else ''
    fail(f'{e.strerror}{where}: free space (or fix the cause) and rerun the same command; it '
         'resumes from the last checkpoint.')


def _print_help(argv: Sequence[str]):
  main_module = sys.modules['__main__']
  print((main_module.__doc__ or '').strip())
  print('\nFlags:')
  print(flags.FLAGS.module_help(main_module))
  if '--helpfull' in argv:
    print(flags.FLAGS.get_help())


def _flag_value(argv: Sequence[str], name: str) -> str | None:
  """The value of `--name=V` or `--name V` in `argv` (the last one wins), else None."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      value = arg.split('=', 1)[1]
    elif arg == f'--{name}' and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _split_config_arg(value: str) -> tuple[str, str | None]:
  """`configs/digits.py:vat_ent` -> ('configs/digits.py', 'vat_ent'), as ml_collections reads it."""
  path, _, arg = value.partition(':')
  return path, (arg or None)


def _load_config_file(path: str, arg: str | None = None):
  """Calls `get_config([arg])` of the config file at `path` (the check before absl parses it)."""
  spec = importlib.util.spec_from_file_location('_semimeta_jax_user_config', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    config = module.get_config() if arg is None else module.get_config(arg)
  except errors.UserError as e:
    fail(f'{path}:{arg}: {e}')
  except Exception as e:  # pylint: disable=broad-except
    fail(f'could not load the config file {path}: {type(e).__name__}: {e}')
  import ml_collections  # pylint: disable=g-import-not-at-top
  if not isinstance(config, ml_collections.ConfigDict):
    fail(f'the config file {path}: get_config() returned a {type(config).__name__}, not an '
         'ml_collections.ConfigDict; build it on configs/default.py (default.get_config()).')
  return config


def _field_names(config, prefix: str = '') -> list[str]:
  names = []
  for key, value in config.items():
    names.append(prefix + key)
    if hasattr(value, 'items'):
      names.extend(_field_names(value, f'{prefix}{key}.'))
  return names


def _check_overrides(argv: Sequence[str], config_path: str, config_arg: str | None = None):
  """Refuses an override of a field the config does not have, suggesting the closest one.

  A field's earlier flat name (e.g. `vat_epsilon`) is refused with its new name.
  """
  from semimeta_jax import run_dir  # pylint: disable=g-import-not-at-top
  config = _load_config_file(config_path, config_arg)
  known = set(_field_names(config))
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    field = arg[len('--config.'):].split('=', 1)[0]
    if field not in known:
      renamed = run_dir.RENAMED_FIELDS.get(field)
      close = [renamed] if renamed in known else difflib.get_close_matches(field, sorted(known), n=1)
      hint = f' (did you mean {close[0]!r}?)' if close else ''
      fail(f'unknown config field {field!r}{hint}; `--dry_run` lists every field of {config_path}.')


def parse_flags_or_exit(argv: list[str]) -> list[str]:
  """absl's flags parser, with `--help` exiting 0 and every parse error in one line (exit 2)."""
  if any(arg in _HELP_FLAGS for arg in argv[1:]):
    _print_help(argv)
    sys.exit(0)
  config_path, config_arg = _split_config_arg(_flag_value(argv, 'config') or '')
  if not config_path:
    fail('--config is required, e.g. --config=configs/digits.py (see --help).')
  if not os.path.isfile(config_path):
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
    listing = ', '.join(sorted(f for f in os.listdir(here) if f.endswith('.py'))) if os.path.isdir(
        here) else ''
    fail(f'config file {config_path!r} not found' + (f'; the configs in {here} are {listing}.'
                                                       if listing else '.'))
  _check_overrides(argv, config_path, config_arg)
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.config_with_absl()  # --jax_* flags, e.g. --jax_platforms=cpu.
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f'{e} (see --help).')
  except Exception as e:  # pylint: disable=broad-except
    # config_flags reports an override it cannot apply with its own exceptions.
    fail(f'{type(e).__name__}: {e}'.replace('\n', ' '))


def check_workdir(workdir: str | None) -> str:
  """The workdir as an absolute path (local) or URL, or a one-line error if unusable."""
  if workdir is None or not workdir.strip():
    fail('--workdir is required and must not be empty, e.g. --workdir=runs/digits.')
  try:
    # TensorBoard, orbax and the JSON records all need a name that is text.
    workdir.encode('utf-8')
  except UnicodeEncodeError:
    fail(f'--workdir={os.fsencode(workdir)!r} holds bytes that are not UTF-8 text: give a '
         'workdir whose name is UTF-8.')
  if '://' in workdir:
    return workdir  # gs://... : checked when first written.
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    fail(f'--workdir={workdir}: {path} exists and is not a directory.')
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    fail(f'--workdir={workdir}: {existing} is not a writable directory.')
  return path


def check_config(config):
  """Validates every field that needs no data or devices (raises `ConfigError`)."""
  from semimeta_jax import validation  # pylint: disable=g-import-not-at-top
  validation.validate_config(config)


class _QuietLibraries(std_logging.Filter):
  """Drops the INFO chatter of orbax, TFDS and JAX's backend probing (every save logs dozens)."""

  _NOISY = ('/orbax/', '/tensorflow_datasets/', '/jax/_src/xla_bridge')

  def filter(self, record):
    noisy = any(part in record.pathname for part in self._NOISY)
    return record.levelno >= std_logging.WARNING or not noisy


def quiet_libraries():
  """Silences library INFO logs; the run's own INFO lines (progress, errors) stay."""
  # The ABSLHandler forwards records without applying its own filters.
  logging.get_absl_handler().python_handler.addFilter(_QuietLibraries())


def import_tensorflow_quietly():
  """Imports TensorFlow (if installed) with its C++ start-up lines kept off the terminal.

  TensorFlow writes its oneDNN notice through C++ logging while loading, which
  neither TF_CPP_MIN_LOG_LEVEL nor Python can filter, so stderr's file
  descriptor is pointed at /dev/null for the import alone. An import error
  still raises (after stderr is restored) when the data layer imports it.
  """
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    pass
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def route_library_noise(workdir: str):
  """Sends the libraries' tracebacks and error records to `<workdir>/library.log` (see library_log)."""
  library_log.route_to_workdir(workdir)


def stop_cleanly_on_sigterm():
  """A SIGTERM at any moment of the run ends it cleanly (see `preemption.remember_termination`)."""
  from semimeta_jax import preemption  # pylint: disable=g-import-not-at-top
  preemption.remember_termination()


def _launched_on_several_hosts() -> bool:
  """A SLURM job with several tasks, or a TPU pod slice with several workers."""
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    return True
  return ',' in os.environ.get('TPU_WORKER_HOSTNAMES', '')


def initialize_distributed(mode: str, coordinator: str | None, num_processes: int | None,
                           process_id: int | None):
  """Starts jax.distributed when asked or detected, and logs the devices."""
  import jax  # pylint: disable=g-import-not-at-top
  if mode == 'on' or (mode == 'auto' and (coordinator is not None or _launched_on_several_hosts())):
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  logging.info('JAX process %d of %d, %d local / %d global devices: %s', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices())


def describe_run(config, workdir: str) -> str:
  """The resolved config and the run plan, as printed by `--dry_run` (reads, never writes)."""
  from semimeta_jax import plan  # pylint: disable=g-import-not-at-top
  return f'# Resolved config\n{config}\n# Run plan\n{plan.run_plan(config, workdir)}'


def print_outcome(summary: dict[str, Any], workdir: str):
  """The last lines of a run: where it stopped, its test error and where to look."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return
  error = summary.get('final_error_top1')
  state = ('finished' if summary.get('completed') else
           'stopped after a preemption request' if summary.get('preempted') else 'stopped')
  lines = [f'Run {state} at step {summary.get("steps")}.']
  if error is not None:
    median, count = summary.get('median_last_20_error_top1'), summary.get('median_last_20_count')
    smoothed = f'; median of the last {count} evaluations {median:.2f}%' if median is not None else ''
    lines.append(f'Final test error {error:.2f}%{smoothed} on '
                 f'{summary.get("num_eval_examples")} test examples.')
    at_best = summary.get('test_error_top1_at_best_validation')
    if at_best is not None:
      lines.append(f'Test error at the best validation step ({summary.get("best_validation_step")}, '
                   f'validation error {summary.get("best_validation_error_top1"):.2f}% on '
                   f'{summary.get("num_validation_examples")} held-out examples): {at_best:.2f}%.')
  if summary.get('preempted'):
    lines.append('Rerun the same command to resume.')
  from semimeta_jax import preemption  # pylint: disable=g-import-not-at-top
  if preemption.termination_requested():
    lines.append('A stop request (SIGTERM) arrived after the last step: the run saved and '
                 'finished first.' if summary.get('completed') else
                 'A stop request (SIGTERM) arrived at the end of the run; it saved first.')
  lines.append(f'Summary: {os.path.join(workdir, "summary.json")}')
  lines.append(f'Curves:  tensorboard --logdir={workdir}   (also {os.path.join(workdir, "metrics.jsonl")})')
  print('\n'.join(lines))
