"""What a run ran on, recorded in its summary: results can depend on it.

On a CPU, XLA splits reductions over as many threads as the process may use, so
the same seed can end points apart on 1 and 2 cores (measured on digits:
labeled-only seed 0 16.33 % on 2 cores, 13.00 % pinned to one). A results
table should say which machine each figure came from.
"""

import os
import platform
import sys

import jax


def usable_cpu_count() -> int:
  """The CPU cores this process may run on (its affinity mask, where the OS has one)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    return os.cpu_count() or 1


def describe() -> dict:
  """{'jax', 'backend', 'device_kind', 'local_devices', 'global_devices', 'processes', 'cpu_cores',
  'python', 'machine'}: JSON-able."""
  local = jax.local_devices()
  return {
      'jax': jax.__version__,
      'backend': jax.default_backend(),
      'device_kind': local[0].device_kind,
      'local_devices': len(local),
      'global_devices': jax.device_count(),
      'processes': jax.process_count(),
      'cpu_cores': usable_cpu_count(),
      'python': sys.version.split()[0],
      'machine': platform.machine(),
  }
