"""benchmark_train runs the real loop with TensorFlow, TFDS and clu absent, at a tiny size."""

import csv
import os
import subprocess
import sys

import pytest

from experiments import benchmark_train

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Made absent by the test itself (not by the script's own blocking), as on the GPU machines.
_ABSENT = ('tensorflow', 'tensorflow_datasets', 'clu')
_TINY = ['--small', '--allow_tensorflow', '--precisions=fp32', '--model_width=4', '--batch_size=8',
         '--num_train=200', '--num_test=40', '--num_labels=20', '--eval_batch_size=8', '--steps=12',
         '--log_every=2', '--eval_every=4', '--checkpoint_every=8', '--bare_steps=2']


@pytest.mark.slow
def test_the_synthetic_loop_runs_without_tensorflow(tmp_path):
  # `python -m experiments.benchmark_train`, with the modules made absent first.
  program = (
      'import runpy, sys\n'
      f'for name in {_ABSENT!r}: sys.modules[name] = None\n'
      'sys.argv = ["experiments.benchmark_train"] + sys.argv[1:]\n'
      'runpy.run_module("experiments.benchmark_train", run_name="__main__", alter_sys=True)\n'
      f'assert not [n for n in sys.modules if n.split(".")[0] in {_ABSENT!r} and sys.modules[n]]\n')
  env = dict(os.environ, XLA_FLAGS='--xla_backend_optimization_level=0', JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join(filter(None, (_REPO, os.environ.get('PYTHONPATH')))))
  result = subprocess.run([sys.executable, '-c', program, *_TINY, f'--out={tmp_path}'], env=env,
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=600,
                          check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  assert 'TensorFlow/TFDS/clu imported: none' in result.stdout
  with open(tmp_path / 'benchmark_train_small_cpu.csv') as f:
    (row,) = list(csv.DictReader(f))
  assert row['precision'] == 'fp32' and row['batch'] == '8+8'
  assert float(row['bare_steps_per_s']) > 0 and float(row['loop_steps_per_s']) > 0
  ratio = float(row['loop_steps_per_s']) / float(row['bare_steps_per_s'])
  assert abs(float(row['ratio']) - ratio) < 1e-9
  # Window: from the report after the first evaluation (step 4) to the last step.
  assert row['window'] == '6-12' and row['evals_in_window'] == '1'


def test_the_report_clock_times_the_window_after_the_first_evaluation():
  clock = benchmark_train.ReportClock()
  clock.marks = [(2, 0.0, 0.0), (4, 1.0, 2.0), (6, 5.0, 6.0), (8, 6.0, 8.0), (10, 7.0, 10.0)]
  # From step 6 (wall 5 s, CPU 6 s) to step 10 (7 s, 10 s): 4 steps in 2 s and in 4 CPU s.
  assert clock.rates(after_step=4) == (2.0, 1.0, 4)
