"""Trains and evaluates a semi-supervised model.

Usage:
  python -m semimeta_jax.main --config=configs/digits.py --workdir=runs/digits [--config.FIELD=VALUE ...]

Every field of the config file can be overridden on the command line, nested
fields with dots: `--config.hypergrad.mode=exact --config.seed=3
--config.data.data_dir=/data/tfds`. Add `--dry_run` to print the resolved config
(every field and its value) and the run plan (steps, epochs over the labeled
and unlabeled pools, devices, workdir) and exit without writing anything.

Rerunning a command resumes its workdir from the last checkpoint. On several
hosts, start the same command on every host: TPU pods and SLURM are detected by
`jax.distributed.initialize()`; elsewhere pass --coordinator_address,
--num_processes and --process_id.

A mistake in the command, the config, the data or the workdir is reported in
one line on stderr with exit code 2; the libraries' own tracebacks and error
records go to <workdir>/library.log rather than the terminal. A SIGTERM at any
moment stops the run cleanly: it saves, says so and exits 0, and rerunning the
command resumes it.
"""

import os

# Before TensorFlow or JAX load: their C++ start-up INFO lines (oneDNN notices,
# absl::InitializeLog warnings) say nothing a user can act on.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from semimeta_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training configuration file, e.g. configs/digits.py; override its fields with '
    '--config.FIELD=VALUE.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the summary.')
_DRY_RUN = flags.DEFINE_bool(
    'dry_run', False, 'Print the resolved config and the run plan, then exit without writing anything.')
_MULTIHOST = flags.DEFINE_enum(
    'multihost', 'auto', ['auto', 'on', 'off'],
    "jax.distributed: 'on' always initialises it (auto-detected cluster), 'auto' when a "
    'coordinator is given or a SLURM / TPU-pod launch is detected, "off" never.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-host).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1 (multi-host).')


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; every option is a --flag (see --help).')
  cli.quiet_libraries()
  cli.import_tensorflow_quietly()
  with cli.user_errors_exit():
    workdir = cli.check_workdir(_WORKDIR.value)
    cli.check_config(_CONFIG.value)
    cli.initialize_distributed(_MULTIHOST.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value)
    if _DRY_RUN.value:
      print(cli.describe_run(_CONFIG.value, workdir))
      return
    cli.route_library_noise(workdir)
    cli.stop_cleanly_on_sigterm()
    # Imported here: it loads TensorFlow (seconds), which --help and argument errors do not need.
    from semimeta_jax import train  # pylint: disable=g-import-not-at-top
    summary = train.train_and_evaluate(_CONFIG.value, workdir)
  cli.print_outcome(summary, workdir)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_or_exit)
