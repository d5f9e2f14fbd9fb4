"""Command line: `python -m semimeta_jax.main --config=configs/digits.py --workdir=DIR`.

Any config field can be overridden, e.g. `--config.hypergrad.mode=exact`. On several
hosts, start the same command on every host: TPU pods and SLURM are detected by
`jax.distributed.initialize()`; elsewhere pass --coordinator_address, --num_processes
and --process_id.
"""

import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

# Config files live in configs/ beside the package; make them importable from a checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from semimeta_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the summary.')
_MULTIHOST = flags.DEFINE_enum(
    'multihost', 'auto', ['auto', 'on', 'off'],
    "jax.distributed: 'on' always initialises it (auto-detected cluster), 'auto' when a "
    'coordinator is given or a SLURM / TPU-pod launch is detected, "off" never.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-host).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1 (multi-host).')

flags.mark_flags_as_required(['config', 'workdir'])


class _QuietLibraries(std_logging.Filter):
  """Drops the INFO chatter of orbax and TFDS (every save logs dozens of lines)."""

  def filter(self, record):
    noisy = any(part in record.pathname for part in ('/orbax/', '/tensorflow_datasets/'))
    return record.levelno >= std_logging.WARNING or not noisy


def _launched_on_several_hosts() -> bool:
  """A SLURM job with several tasks, or a TPU pod slice with several workers."""
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    return True
  return ',' in os.environ.get('TPU_WORKER_HOSTNAMES', '')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # The ABSLHandler forwards records without applying its own filters.
  logging.get_absl_handler().python_handler.addFilter(_QuietLibraries())
  explicit = _COORDINATOR.value is not None
  if _MULTIHOST.value == 'on' or (_MULTIHOST.value == 'auto' and (explicit or _launched_on_several_hosts())):
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  logging.info('JAX process %d of %d, %d local / %d global devices: %s', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices())
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  jax.config.config_with_absl()
  app.run(main)
