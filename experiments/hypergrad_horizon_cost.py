r"""Cost of the meta step against the horizon K: unrolled `exact` and output-space `neumann`.

For each K the meta step alone (initial pseudo-labels, hypergradient, pseudo-label
update: `semimeta.meta_pseudo_labels`) is compiled for `exact` (reverse-over-reverse
through K unrolled virtual steps) and `neumann` (K output-space terms), and the table
gives the compile time, the median wall time of a call and XLA's memory_analysis of
the compiled program: its temporaries (the working memory that grows with K when
the steps are unrolled) and temporaries + arguments + outputs. Where the meta forward
is in evaluation mode the two compute the same g (to rounding); in training mode
`neumann` is a Gauss-Newton approximation. `implicit` (the K -> infinity limit,
`--cg_iterations` steps) is measured once for comparison. With `--unrolled_loops`,
`neumann` and `implicit` are also measured with their loops fully unrolled
(`hypergrad.loop_unroll`: the same values; XLA:CPU runs a loop body several times
slower than straight-line code).

  python -m experiments.hypergrad_horizon_cost --out=results/horizon_cost
"""

import csv
import datetime
import functools
import os
import pathlib
import time

from absl import app
from absl import flags
import jax
import numpy as np

from configs import default
from experiments import benchmark_step
from semimeta_jax import models
from semimeta_jax.methods import semimeta

COST_FIELDS = ('forward_mode', 'mode', 'inner_steps', 'loop_unroll', 'compile_s', 'median_ms', 'temp_mib',
               'compiled_mib')


def meta_step_config(*, model: str, width: int, batch_size: int, cg_iterations: int):
  """The default config at a small size."""
  config = default.get_config()
  config.model, config.model_width = model, width
  config.labeled_batch_size = config.unlabeled_batch_size = batch_size
  config.hypergrad.cg_iterations = cg_iterations
  return config


def meta_step_cost(config, state, batch, *, lr: float, repeats: int) -> dict:
  """Compile time, median call time and compiled memory of the meta step under `config`.

  Returns:
    {'compile_s', 'median_ms', 'temp_mib', 'compiled_mib'}.
  """
  meta = jax.jit(functools.partial(semimeta.meta_pseudo_labels, lr=lr, key=jax.random.key(0),
                                   config=config))
  args = (state, batch['labeled'], batch['unlabeled'])
  started = time.perf_counter()
  compiled = meta.lower(*args).compile()
  compile_s = time.perf_counter() - started
  jax.block_until_ready(compiled(*args))  # The first call may still allocate; it is not timed.
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - started)
  stats = compiled.memory_analysis()
  temp = float('nan') if stats is None else stats.temp_size_in_bytes / 2**20
  return {'compile_s': compile_s, 'median_ms': 1e3 * float(np.median(times)), 'temp_mib': temp,
          'compiled_mib': benchmark_step.compiled_bytes(compiled) / 2**20}


def horizon_cost_rows(config, image_shape, *, num_classes: int, forward_modes, horizons,
                      repeats: int, lr: float = 0.1, unrolled_loops: bool = False):
  """Rows (COST_FIELDS): `exact` and `neumann` at each K of `horizons`, `implicit` once.

  Args:
    config: the run config (model, batch size, `hypergrad.cg_iterations` are read).
    image_shape: one example's shape; the batch is synthetic.
    num_classes: the model's outputs.
    forward_modes: the meta forward modes to measure ('eval', 'train').
    horizons: the K to measure.
    repeats: timed calls per variant.
    lr: alpha (the inner step size) and the learning rate of the meta step.
    unrolled_loops: also `neumann` and `implicit` with their loops fully unrolled.
  """
  rows = []
  batch_size = config.unlabeled_batch_size
  state = benchmark_step.initial_state(config, models.get_model(config, num_classes), image_shape,
                                       jax.random.key(0))
  batch = benchmark_step.synthetic_batch(jax.random.key(1), batch_size, image_shape, num_classes)
  for forward_mode in forward_modes:
    variants = [(mode, k, 1) for k in horizons for mode in ('exact', 'neumann')]
    variants.append(('implicit', 1, 1))
    if unrolled_loops:
      variants += [('neumann', k, k) for k in horizons]
      variants.append(('implicit', 1, config.hypergrad.cg_iterations))
    for mode, k, unroll in variants:
      variant = config.copy_and_resolve_references()
      variant.hypergrad.mode, variant.hypergrad.inner_steps = mode, k
      variant.hypergrad.forward_mode, variant.hypergrad.loop_unroll = forward_mode, unroll
      cost = meta_step_cost(variant, state, batch, lr=lr, repeats=repeats)
      rows.append({'forward_mode': forward_mode, 'mode': mode, 'inner_steps': k,
                   'loop_unroll': unroll, **cost})
  return rows


def horizon_cost_table(rows) -> str:
  """Markdown: for each (forward mode, K), `exact` and `neumann` side by side; `implicit` after.

  Rows with unrolled loops (`loop_unroll` > 1) add two columns for `neumann`/`implicit` unrolled.
  """
  cells = {(r['forward_mode'], r['mode'], r['inner_steps'], r.get('loop_unroll', 1) > 1): r
           for r in rows}
  unrolled = any(r.get('loop_unroll', 1) > 1 for r in rows)
  extra = ' neumann unrolled ms | neumann unrolled temp MiB |' if unrolled else ''
  lines = ['| meta forward | K | exact ms | neumann ms | exact temp MiB | neumann temp MiB | '
           f'exact compile s | neumann compile s |{extra}', '|---' * (8 + 2 * unrolled) + '|']

  def unrolled_cells(forward_mode, mode, k):
    if not unrolled:
      return ''
    row = cells.get((forward_mode, mode, k, True))
    return ' - | - |' if row is None else f' {row["median_ms"]:.1f} | {row["temp_mib"]:.2f} |'

  keys = dict.fromkeys((r['forward_mode'], r['inner_steps']) for r in rows if r['mode'] != 'implicit')
  for forward_mode, k in keys:
    exact = cells.get((forward_mode, 'exact', k, False))
    series = cells.get((forward_mode, 'neumann', k, False))
    if exact is None or series is None:
      continue
    lines.append(f'| {forward_mode} | {k} | {exact["median_ms"]:.1f} | {series["median_ms"]:.1f} | '
                 f'{exact["temp_mib"]:.2f} | {series["temp_mib"]:.2f} | {exact["compile_s"]:.1f} | '
                 f'{series["compile_s"]:.1f} |{unrolled_cells(forward_mode, "neumann", k)}')
  for r in rows:
    if r['mode'] == 'implicit' and r.get('loop_unroll', 1) == 1:
      lines.append(f'| {r["forward_mode"]} | implicit | - | {r["median_ms"]:.1f} | - | '
                   f'{r["temp_mib"]:.2f} | - | {r["compile_s"]:.1f} |'
                   f'{unrolled_cells(r["forward_mode"], "implicit", 1)}')
  return '\n'.join(lines)


def write_csv(rows, path: pathlib.Path):
  """`rows` as a CSV with the columns COST_FIELDS."""
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=COST_FIELDS, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)


def _define_flags():
  """The command line; defined on demand so that importing this module defines no flags."""
  flags.DEFINE_string('out', 'results/horizon_cost', 'Directory for horizon_cost.md and .csv.')
  flags.DEFINE_string('model', 'convlarge_digits', f'One of {models.MODEL_NAMES}.')
  flags.DEFINE_integer('width', 32, 'config.model_width (0: the model default).')
  flags.DEFINE_integer('batch_size', 32, 'Labeled and unlabeled batch size.')
  flags.DEFINE_list('horizons', ['1', '2', '4', '8', '16'], 'The K to measure.')
  flags.DEFINE_list('forward_modes', ['eval', 'train'], 'Meta forward modes.')
  flags.DEFINE_integer('cg_iterations', 20, 'CG steps of the implicit row.')
  flags.DEFINE_integer('repeats', 10, 'Timed calls per variant (the median is reported).')
  flags.DEFINE_bool('unrolled_loops', False, 'Also measure `neumann` and `implicit` with their loops '
                    'fully unrolled (hypergrad.loop_unroll).')


def main(argv):
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  horizons = [int(k) for k in FLAGS.horizons]
  if min(horizons) < 1:
    raise app.UsageError(f'--horizons must be >= 1, got {horizons}.')
  started = time.time()
  config = meta_step_config(model=FLAGS.model, width=FLAGS.width, batch_size=FLAGS.batch_size,
                            cg_iterations=FLAGS.cg_iterations)
  image_shape = (8, 8, 1) if FLAGS.model == 'convlarge_digits' else (32, 32, 3)
  rows = horizon_cost_rows(config, image_shape, num_classes=10, forward_modes=FLAGS.forward_modes,
                           horizons=horizons, repeats=FLAGS.repeats,
                           unrolled_loops=FLAGS.unrolled_loops)
  out = pathlib.Path(FLAGS.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  header = (f'Meta step (pseudo-labels, hypergradient, update) of {FLAGS.model} width {FLAGS.width}, '
            f'batch {FLAGS.batch_size} + {FLAGS.batch_size}; median of {FLAGS.repeats} calls; temp MiB '
            f'= XLA memory_analysis temporaries. {datetime.datetime.now().isoformat(timespec="seconds")}, '
            f'jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} device(s), '
            f'{os.cpu_count()} host CPUs; {time.time() - started:.0f} s in all.')
  markdown = f'{header}\n\n{horizon_cost_table(rows)}\n'
  (out / 'horizon_cost.md').write_text(markdown)
  write_csv(rows, out / 'horizon_cost.csv')
  print(markdown)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
