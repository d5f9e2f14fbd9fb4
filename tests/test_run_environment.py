"""The machine a run records in its summary."""

import json
import os
import subprocess
import sys

import jax
import pytest

from semimeta_jax import run_environment


def test_describes_this_process():
  described = run_environment.describe()
  assert described['jax'] == jax.__version__
  assert described['backend'] == jax.default_backend()
  assert described['global_devices'] == jax.device_count() >= described['local_devices'] >= 1
  assert described['processes'] == jax.process_count()
  assert 1 <= described['cpu_cores'] <= (os.cpu_count() or 1)
  json.dumps(described)  # It goes into summary.json.


@pytest.mark.skipif(not hasattr(os, 'sched_setaffinity'), reason='no CPU affinity on this OS')
def test_counts_the_cores_the_process_may_use_not_the_machines():
  code = ('import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); '
          'from semimeta_jax import run_environment; print(run_environment.usable_cpu_count())')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                          check=True)
  assert result.stdout.strip() == '1'
