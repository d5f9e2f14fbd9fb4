r"""The training loop against its bare compiled step: steps/s of each, fp32 and bf16.

  loop   `train.train_and_evaluate` (what `main` runs): device-resident input made
         from (seed, step), metrics every `--log_every` steps, evaluation of the
         padded test split every `--eval_every`, checkpoints every
         `--checkpoint_every`, on a synthetic in-memory CIFAR-shaped split (random
         uint8 images, `data/synthetic.py`). It is timed between its own
         training-metric reports (each made after waiting for the device), from
         the first report after the first evaluation (whose compilation is not
         counted) to the end; the later evaluations and checkpoints count.
  bare   the same config's compiled step (`parallel.jit_train_step`) on the same
         state, one batch computed on the device beforehand, `--bare_steps`
         steps dispatched back to back and awaited once; measured before and
         after the loop, the mean reported.

TensorFlow, TFDS and clu are blocked from import (`--allow_tensorflow` lifts it):
this is how it runs on the GPU machines, which have none of them.

  python -m experiments.benchmark_train --small --out=results   # 2 CPU cores
  python -m experiments.benchmark_train --out=results           # GPU: ConvLarge 128+128, 32x32x3
"""

import argparse
import csv
import datetime
import os
import shutil
import sys
import tempfile
import time

BLOCKED = ('tensorflow', 'tensorflow_datasets', 'clu')


def block_imports(names=BLOCKED):
  """Makes `names` look uninstalled: `import` raises ModuleNotFoundError, `find_spec` gives None."""
  for name in names:
    sys.modules[name] = None


if __name__ == '__main__' and '--allow_tensorflow' not in sys.argv:
  block_imports()

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging
import jax
import numpy as np

from configs import default
from semimeta_jax import methods
from semimeta_jax import metrics as metrics_lib
from semimeta_jax import models
from semimeta_jax import parallel
from semimeta_jax import train
from semimeta_jax.data import catalog
from semimeta_jax.data import pipeline
from semimeta_jax.data import synthetic
# pylint: enable=g-import-not-at-top,wrong-import-position

DATASET = 'synthetic_cifar10'
SIZES = {  # The loop's intervals are configs/default.py's at full size, scaled down for CPU.
    'default': dict(model_width=0, batch_size=128, num_train=50000, num_test=10000, num_labels=4000,
                    eval_batch_size=256, steps=2400, log_every=100, eval_every=400,
                    checkpoint_every=2000, bare_steps=200),
    'small': dict(model_width=16, batch_size=32, num_train=5000, num_test=1000, num_labels=500,
                  eval_batch_size=128, steps=300, log_every=20, eval_every=100,
                  checkpoint_every=200, bare_steps=50),
}
FIELDS = ('device', 'precision', 'method', 'model', 'batch', 'bare_steps_per_s', 'loop_steps_per_s',
          'ratio', 'cpu_time_ratio', 'window', 'evals_in_window', 'checkpoints_in_window', 'load_before', 'load_after')


def make_config(args, half_precision: bool):
  """The run's config: configs/default.py on the synthetic split at the benchmark's size."""
  config = default.get_config()
  config.data.name = DATASET
  config.data.num_labels = args.num_labels
  config.method = args.method
  config.hypergrad.mode = args.mode
  config.model = 'convlarge'
  config.model_width = args.model_width
  config.labeled_batch_size = config.unlabeled_batch_size = args.batch_size
  config.eval_batch_size = args.eval_batch_size
  config.half_precision = half_precision
  # Full step sizes from step 0, as in benchmark_step: the meta step at lr = 0 is not the one timed.
  config.warmup_steps = 0
  config.consistency_rampup_steps = 0
  config.num_train_steps = args.steps
  config.lr_decay_boundaries = (args.steps + 1, args.steps + 2)
  config.log_every_steps = args.log_every
  config.eval_every_steps = args.eval_every
  config.checkpoint_every_steps = args.checkpoint_every
  config.keep_checkpoints = 1
  return config


class ReportClock:
  """Records (step, wall s, process CPU s) at each of the loop's training-metric reports.

  The loop reports after waiting for the device (`metrics.MetricWriter.write_scalars`
  of 'train/*' rows), so these are finished-step times. CPU time (all threads of
  this process) is the figure that a shared, loaded machine disturbs least.
  """

  def __init__(self):
    self.marks = []
    self._original = metrics_lib.MetricWriter.write_scalars

  def __enter__(self):
    clock = self

    def write_scalars(writer, step, scalars):
      if any(name.startswith('train/') for name in scalars):
        clock.marks.append((int(step), time.perf_counter(), time.process_time()))
      return clock._original(writer, step, scalars)

    metrics_lib.MetricWriter.write_scalars = write_scalars
    return self

  def __exit__(self, *exc_info):
    metrics_lib.MetricWriter.write_scalars = self._original

  def rates(self, after_step: int) -> tuple[float, float, int]:
    """(steps per wall s, steps per CPU s, steps) from the first report after `after_step` on.

    The first evaluation (compiled then) runs after the report at its step, so
    the window starts at the next report.
    """
    marks = [m for m in self.marks if m[0] > after_step]
    if len(marks) < 2:
      raise ValueError(f'Fewer than 2 reports after step {after_step}; run more --steps.')
    (first, wall0, cpu0), (last, wall1, cpu1) = marks[0], marks[-1]
    return (last - first) / (wall1 - wall0), (last - first) / (cpu1 - cpu0), last - first


class BareStep:
  """The config's compiled step on its initial state, with one batch made on the device beforehand."""

  def __init__(self, config):
    info = catalog.dataset_info(config.data)
    mesh = parallel.make_mesh()
    self.state = train.create_train_state(config, models.get_model(config, info.num_classes),
                                          info.image_shape, mesh)
    self.batch = pipeline.build_input(config, None, mesh=mesh).train_batch(0)
    self.step = parallel.jit_train_step(methods.make_train_step(config, info.num_classes), mesh)
    self.rate(3)  # Compiles and warms up.

  def rate(self, num_steps: int) -> tuple[float, float]:
    """(steps per wall s, per CPU s) of `num_steps` steps dispatched back to back, awaited once."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(num_steps):
      self.state, metrics = self.step(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    return num_steps / (time.perf_counter() - wall), num_steps / (time.process_time() - cpu)


def measure(args, half_precision: bool) -> dict:
  """One table row: the bare step before and after the loop, and the loop."""
  config = make_config(args, half_precision)
  load_before = os.getloadavg()[0]
  bare_step = BareStep(config)
  bare = [bare_step.rate(args.bare_steps)]
  workdir = tempfile.mkdtemp(prefix='benchmark_train_')
  try:
    with ReportClock() as clock:
      train.train_and_evaluate(config, workdir)
    loop, loop_cpu, window = clock.rates(args.eval_every)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  bare.append(bare_step.rate(args.bare_steps))
  bare, bare_cpu = np.mean(bare, axis=0)
  first = args.eval_every
  in_window = lambda every: len(range(every * (first // every + 1), args.steps, every))
  device = jax.devices()[0]
  return {
      'device': f'{jax.device_count()} x {device.device_kind}',
      'precision': 'bf16' if half_precision else 'fp32',
      'method': args.method + (f' / {args.mode}' if args.method == 'semimeta' else ''),
      'model': f'convlarge (width {args.model_width or 128})',
      'batch': f'{args.batch_size}+{args.batch_size if args.method != "supervised" else 0}',
      'bare_steps_per_s': float(bare), 'loop_steps_per_s': loop, 'ratio': loop / float(bare),
      'cpu_time_ratio': loop_cpu / float(bare_cpu), 'window': f'{args.steps - window}-{args.steps}',
      'evals_in_window': in_window(args.eval_every),
      'checkpoints_in_window': in_window(args.checkpoint_every),
      'load_before': load_before, 'load_after': os.getloadavg()[0],
  }


def render(rows, notes) -> str:
  """Notes, then the rows as a markdown table."""
  fmt = lambda v: f'{v:.3g}' if isinstance(v, float) else str(v)
  lines = ['| ' + ' | '.join(FIELDS) + ' |', '|' + '---|' * len(FIELDS)]
  lines += ['| ' + ' | '.join(fmt(row[f]) for f in FIELDS) + ' |' for row in rows]
  return '\n'.join(list(notes) + [''] + lines) + '\n'


def _parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--small', action='store_true', help='2-CPU-core sizes (SIZES["small"]).')
  for name, kind in (('model_width', int), ('batch_size', int), ('num_train', int),
                     ('num_test', int), ('num_labels', int), ('eval_batch_size', int),
                     ('steps', int), ('log_every', int), ('eval_every', int),
                     ('checkpoint_every', int), ('bare_steps', int)):
    parser.add_argument(f'--{name}', type=kind, default=None, help='Overrides the size preset.')
  parser.add_argument('--precisions', default='fp32,bf16', help='Comma-separated: fp32, bf16.')
  parser.add_argument('--method', default='semimeta', choices=('semimeta', 'supervised'))
  parser.add_argument('--mode', default='finite_difference', help='config.hypergrad.mode.')
  parser.add_argument('--out', default='results', help='Directory of the table (md and csv).')
  parser.add_argument('--allow_tensorflow', action='store_true',
                      help='Do not block TensorFlow / TFDS / clu imports.')
  args = parser.parse_args(argv)
  for name, value in SIZES['small' if args.small else 'default'].items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  return args


def main(argv=None):
  args = _parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  synthetic.register(DATASET, num_train=args.num_train, num_test=args.num_test)
  # The loop compiles the same step as the bare one: a persistent cache compiles it once.
  cache = tempfile.mkdtemp(prefix='benchmark_train_cache_')
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  rows = []
  for precision in args.precisions.split(','):
    rows.append(measure(args, half_precision=precision.strip() == 'bf16'))
    print(render(rows[-1:], []), flush=True)
  imported = [name for name in BLOCKED if sys.modules.get(name) is not None]
  notes = [
      f'Command: `python -m experiments.benchmark_train {" ".join(argv or sys.argv[1:])}`',
      f'Date: {datetime.datetime.now().isoformat(timespec="seconds")}; jax {jax.__version__}; '
      f'{jax.device_count()} {jax.devices()[0].platform} device(s); host CPUs: {os.cpu_count()}; '
      f'TensorFlow/TFDS/clu imported: {imported or "none"}.',
      f'Loop: {args.steps} steps of train.train_and_evaluate on {DATASET} ({args.num_train} train / '
      f'{args.num_test} test, {args.num_labels} labels); metrics every {args.log_every}, evaluation '
      f'every {args.eval_every}, checkpoint every {args.checkpoint_every} steps; rate over the '
      'window (after the first evaluation) between its own training-metric reports. Bare: the '
      f'compiled step, {args.bare_steps} steps pipelined, before and after the loop (mean). '
      'ratio = loop / bare steps per wall second; cpu_time_ratio = the same per second of process '
      'CPU time (all threads), less disturbed by other load; load = 1-min load average.',
  ]
  table = render(rows, notes)
  os.makedirs(args.out, exist_ok=True)
  tag = 'small' if args.small else 'default'
  path = os.path.join(args.out, f'benchmark_train_{tag}_{jax.devices()[0].platform}')
  with open(path + '.md', 'w') as f:
    f.write(table)
  with open(path + '.csv', 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(rows)
  print(table + f'Wrote {path}.md and .csv.')
  shutil.rmtree(cache, ignore_errors=True)
  return rows


if __name__ == '__main__':
  main()
