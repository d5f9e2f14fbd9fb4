r"""Exact vs approximate hypergradients: fidelity during a real run, step cost, final error.

1. Fidelity. One run of `--config` (digits by default) is trained with a checkpoint at
   every step in `--steps` (or an existing run is read from `--run_dir`). At each of
   those steps the state is restored, the batches that step and the next ones of the
   run would train on are rebuilt (`data.build_input(start_step=step)`), and g is
   computed on each batch by every estimator with the same state, batch and
   dropout key. For each other mode (first_order, jvp, finite_difference, neumann,
   implicit) the table gives its cosine similarity and relative error against `exact`,
   averaged over `--num_batches` batches, in both meta forward modes ('eval', the
   official one, and 'train': dropout and batch statistics on) and for K in
   `--inner_steps`. The reference `exact` unrolls K virtual steps; `neumann` takes the
   same K in output space; the others are K = 1 formulas, so the K > 1 rows show how
   far they drift from a K-step meta objective. A second table compares every mode
   with `implicit`, the K -> infinity limit.
   At step 0 the warm-up learning rate (hence alpha and every g) is 0; that point
   uses the learning rate of step 1.
2. Step cost: compile time, median step time and XLA's memory_analysis bytes of the
   full compiled training step of each mode (`benchmark_step.measure_step`), `exact`
   and `neumann` at each K of `--inner_steps`.
3. Meta-step cost against K (`--horizons`): time and compiled memory of the meta
   step for unrolled `exact` and output-space `neumann` (`hypergrad_horizon_cost`).
4. Final test error: each mode trained to the end for `--train_seeds` by
   `digits_results.py` (configs/digits.py; `--skip_training` leaves this out).

Writes ablation.md (all tables), fidelity.csv, step_cost.csv and fidelity.png into
`--out`, and prints the tables:

  python -m experiments.hypergrad_ablation --out=results/ablation --skip_training \
      --config.data.data_dir=/tmp/tfds
"""

import csv
import datetime
import functools
import json
import math
import os
import pathlib
import sys
import time

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import matplotlib  # pylint: disable=g-import-not-at-top,wrong-import-position

matplotlib.use('Agg')  # Files only; no display is needed or assumed.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments import benchmark_step  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import digits_results  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import hypergrad_horizon_cost  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.hypergrad_fidelity import APPROXIMATIONS  # pylint: disable=g-import-not-at-top,wrong-import-position,unused-import
from experiments.hypergrad_fidelity import fidelity  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.hypergrad_fidelity import FIDELITY_FIELDS  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.hypergrad_fidelity import fidelity_rows  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.hypergrad_fidelity import fidelity_table  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.hypergrad_fidelity import half_precision_fidelity  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.hypergrad_fidelity import half_precision_table  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.hypergrad_fidelity import variant_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from semimeta_jax import checkpoint  # pylint: disable=g-import-not-at-top,wrong-import-position
from semimeta_jax import data  # pylint: disable=g-import-not-at-top,wrong-import-position
from semimeta_jax.methods import hypergrad  # pylint: disable=g-import-not-at-top,wrong-import-position
from semimeta_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from semimeta_jax import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
from semimeta_jax import run_dir as run_dir_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from semimeta_jax import schedules  # pylint: disable=g-import-not-at-top,wrong-import-position
from semimeta_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position

FORWARD_MODES = ('eval', 'train')
COST_FIELDS = ('forward_mode', 'mode', 'inner_steps', 'compile_s', 'median_step_ms', 'compiled_mib',
               'gflop_per_step')
REPO = pathlib.Path(__file__).resolve().parents[1]
DIGITS_CONFIG = REPO / 'configs' / 'digits.py'


def meta_learning_rate(config, step: int) -> float:
  """The learning rate of `step`, or of step 1 where it is 0 (warm-up start: g would be 0)."""
  schedule = schedules.learning_rate_schedule(config)
  lr = float(schedule(step))
  return lr if lr > 0 else float(schedule(1))


def train_fidelity_run(config, run_dir: str, steps):
  """Trains `config` into `run_dir`, keeping a checkpoint at every step of `steps`.

  A finished run is left as it is; an unfinished one resumes. Step 0 needs no
  training (it is the seed's initial state), so `steps` = [0] trains nothing.

  Returns:
    Whether it trained.
  """
  positive = [s for s in steps if s > 0]
  if max(positive, default=0) > config.num_train_steps:
    raise ValueError(f'--steps {steps} go past config.num_train_steps={config.num_train_steps}.')
  summary = pathlib.Path(run_dir) / 'summary.json'
  if not positive or summary.exists() and json.loads(summary.read_text()).get('completed'):
    return False
  config = config.copy_and_resolve_references()
  config.checkpoint_every_steps = math.gcd(*positive)
  config.keep_checkpoints = config.num_train_steps // config.checkpoint_every_steps + 1
  train.train_and_evaluate(config, run_dir)
  return True


def measure_fidelity(config, run_dir: str, steps, *, forward_modes, inner_steps, num_batches: int,
                     half_precision: bool = False):
  """Fidelity rows (FIDELITY_FIELDS) at each step of `steps` that `run_dir` has a state for.

  Step 0 is the run's initial state (re-created from its seed); other steps are
  restored from `run_dir`'s checkpoints, and a missing one is skipped with a warning.
  With `half_precision`, also rows of every mode in bf16 against float32 `exact`.
  """
  info = data.dataset_info(config.data)
  mesh = parallel.make_mesh()
  fresh = train.create_train_state(config, models.get_model(config, info.num_classes),
                                   info.image_shape, mesh)
  checkpointer = checkpoint.Checkpointer(run_dir, keep=max(config.keep_checkpoints, 1),
                                         async_save=False, read_only=True)
  saved = set(checkpointer.all_steps())
  compiled = {(fwd, k): jax.jit(functools.partial(
      fidelity, config=variant_config(config, forward_mode=fwd, inner_steps=k)))
              for fwd in forward_modes for k in inner_steps}
  half = {}
  if half_precision:
    half_apply_fn = models.get_model(variant_config(config, half_precision=True),
                                     info.num_classes).apply
    half = {(fwd, k): jax.jit(functools.partial(
        half_precision_fidelity, half_apply_fn=half_apply_fn,
        config=variant_config(config, forward_mode=fwd, inner_steps=k)))
            for fwd in forward_modes for k in inner_steps}
  rows = []
  for step in steps:
    if step and step not in saved:
      logging.warning('No checkpoint %d in %s (it has %s); skipping it.', step, run_dir, sorted(saved))
      continue
    state = checkpointer.restore(fresh, step) if step else fresh
    inp = data.build_input(config, run_dir, start_step=step, mesh=mesh)
    batches = [inp.train_batch(step + i) for i in range(num_batches)]
    lr = meta_learning_rate(config, step)
    for (fwd, k), fn in compiled.items():
      per_batch = jax.device_get([fn(state, batch, lr) for batch in batches])
      for reference in ('exact', 'implicit'):
        rows += fidelity_rows(per_batch, step=step, lr=lr, forward_mode=fwd, inner_steps=k,
                              reference=reference)
    for (fwd, k), fn in half.items():
      per_batch = jax.device_get([fn(state, batch, lr) for batch in batches])
      rows += fidelity_rows(per_batch, step=step, lr=lr, forward_mode=fwd, inner_steps=k,
                            precision='bf16')
    logging.info('Fidelity measured at step %d.', step)
  checkpointer.close()
  return rows


def measure_step_cost(config, *, forward_modes, inner_steps, steps: int):
  """Compiled training-step cost rows (COST_FIELDS): K = 1 formulas once, `exact` and `neumann` per K."""
  info = data.dataset_info(config.data)
  rows = []
  for fwd in forward_modes:
    variants = ([(mode, 1) for mode in APPROXIMATIONS if mode not in hypergrad.MULTI_STEP_MODES]
                + [(mode, k) for mode in hypergrad.MULTI_STEP_MODES for k in inner_steps])
    for mode, k in variants:
      row = benchmark_step.measure_step(
          variant_config(config, mode=mode, forward_mode=fwd, inner_steps=k),
          num_classes=info.num_classes, image_shape=info.image_shape, steps=steps,
          warmup_steps=2, seed=config.seed)
      rows.append({'forward_mode': fwd, 'mode': mode, 'inner_steps': k,
                   **{name: row[name] for name in COST_FIELDS[3:]}})
  return rows


def cost_table(rows) -> str:
  """Markdown: compile time, step time and compiled memory of each mode's training step."""
  lines = ['| meta forward | mode | K | compile s | median step ms | compiled MiB | GFLOP/step |',
           '|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["forward_mode"]} | {r["mode"]} | {r["inner_steps"]} | {r["compile_s"]:.1f} | '
                 f'{r["median_step_ms"]:.1f} | {r["compiled_mib"]:.1f} | {r["gflop_per_step"]:.3g} |')
  return '\n'.join(lines)


def render_report(header, rows, cost_rows, errors, *, num_batches: int, cost_steps: int,
                  horizon_rows=()) -> str:
  """The markdown report: `header` lines, then the fidelity, step-cost and final-error sections."""
  sections = list(header) + [
      f'## Hypergradient fidelity: cosine / relative error against `exact`\n\nMean over {num_batches} '
      'batches per step (the batches the run trains on from that step). `exact` unrolls K virtual '
      'steps; the approximations are K = 1 formulas. Where theta~ stays near theta (evaluation-mode '
      'meta forward, small learning rate), K steps move theta~ about K times as far, so g_exact is '
      'close to K times the K = 1 value and the relative error near 1 - 1/K: at K > 1 it measures '
      'scale, the cosine direction. The step-0 point uses the learning rate of step 1 (the warm-up '
      'starts at 0). `neumann` follows the K steps in output space (equal to `exact` in evaluation '
      'mode, a Gauss-Newton approximation in training mode); `implicit` is the K -> infinity limit, '
      'on its own scale (it does not depend on alpha), so against `exact` read its cosine.\n\n'
      + fidelity_table(rows),
      '## Hypergradient fidelity: cosine / relative error against `implicit` (K -> infinity)\n\n'
      'The same batches against the implicit-function-theorem hypergradient (config.hypergrad.'
      'cg_iterations CG steps on J J^T + cg_damping I). The scales differ (implicit does not '
      'depend on alpha), so the cosine is the measure of direction.\n\n'
      + fidelity_table(rows, reference='implicit')]
  if any(r.get('precision') == 'bf16' for r in rows):
    sections.append(
        '## bf16 hypergradient fidelity: cosine / relative error against float32 `exact`\n\nEach '
        'mode computed with bfloat16 activations (`config.half_precision`; parameters and g stay '
        'float32) on the same state, batch and dropout draw as the float32 `exact` reference (K '
        'as in the row). The `exact` line is the rounding error of bf16 alone.\n\n'
        + half_precision_table(rows))
  if cost_rows:
    sections.append(f'## Training-step cost\n\nFull compiled training step (synthetic batch), median of '
                    f'{cost_steps} steps; compiled MiB from XLA memory_analysis (temp + arguments + '
                    'outputs - aliased). The approximations do not depend on K.\n\n'
                    + cost_table(cost_rows))
  if horizon_rows:
    sections.append('## Meta-step cost against K: unrolled `exact` and output-space `neumann`\n\n'
                    'The meta step alone (synthetic batch); temp MiB = XLA memory_analysis '
                    'temporaries of the compiled program; `implicit` measured once.\n\n'
                    + hypergrad_horizon_cost.horizon_cost_table(horizon_rows))
  if errors:
    sections.append(f'## Final test error\n\n{errors}')
  return '\n\n'.join(sections) + '\n'


def plot_fidelity(rows, path: str):
  """Cosine and relative error vs training step, a column per K, two rows per forward mode."""
  forward_modes = list(dict.fromkeys(r['forward_mode'] for r in rows))
  inner_steps = sorted({r['inner_steps'] for r in rows})
  metrics = (('cosine', 'cosine to exact'), ('relative_error', 'relative error'))
  fig, axes = plt.subplots(2 * len(forward_modes), len(inner_steps), squeeze=False, sharex=True,
                           figsize=(4 * len(inner_steps), 2.6 * 2 * len(forward_modes)))
  for i, fwd in enumerate(forward_modes):
    for j, k in enumerate(inner_steps):
      for m, (metric, label) in enumerate(metrics):
        ax = axes[2 * i + m, j]
        for mode in APPROXIMATIONS:
          points = sorted((r['step'], r[metric]) for r in rows
                          if (r['forward_mode'], r['inner_steps'], r['mode']) == (fwd, k, mode))
          if points:
            x, y = zip(*points)
            # Exact agreement gives a relative error of 0, which a log axis cannot show.
            y = np.maximum(y, 1e-9) if metric == 'relative_error' else y
            ax.plot(x, y, marker='o', label=mode)
        if metric == 'relative_error':
          ax.set_yscale('log')
        ax.set_title(f'{fwd} forward, K = {k}', fontsize=9)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
  for ax in axes[-1]:
    ax.set_xlabel('training step')
  axes[0, 0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_csv(rows, fields, path: str):
  """Writes `rows` (dicts) as a CSV with the columns `fields`."""
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=fields, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)


def train_final_errors(seeds, out: pathlib.Path, overrides) -> str:
  """Trains every mode to the end for `seeds` (digits_results runs, resumable); its table."""
  rows = []
  for mode in (m for m in hypergrad.MODES if m in digits_results.MODE_VARIANTS):
    variant = digits_results.MODE_VARIANTS[mode]
    for seed in seeds:
      summary = digits_results.run_one(variant, seed, out, None, overrides)
      rows.append(digits_results.summary_row(variant, seed, summary))
  write_csv(rows, list(rows[0]), str(out / 'final_errors.csv'))
  return digits_results.table(rows)


def _define_flags():
  """The command line; defined on demand so that importing this module defines no flags."""
  config_flags.DEFINE_config_file('config', str(DIGITS_CONFIG), 'Run configuration file.')
  flags.DEFINE_string('out', 'results/ablation', 'Directory for the tables, CSVs, plot and runs.')
  flags.DEFINE_string('run_dir', None, 'A run of --config to read checkpoints from (read only; '
                      'default: train one into <out>/fidelity_run).')
  flags.DEFINE_list('steps', ['0', '250', '500', '1000'], 'Training steps to measure at.')
  flags.DEFINE_integer('num_batches', 4, 'Batches averaged per step.')
  flags.DEFINE_list('inner_steps', ['1', '2', '3'], 'K of the exact reference.')
  flags.DEFINE_list('forward_modes', list(FORWARD_MODES), 'Meta forward modes.')
  flags.DEFINE_bool('half_precision', True, 'Also measure every mode in bf16 against float32 exact.')
  flags.DEFINE_integer('cost_steps', 10, 'Timed steps per mode for the step cost (0: skip).')
  flags.DEFINE_list('horizons', ['1', '2', '4', '8', '16'], 'K of the meta-step cost table '
                    '(exact vs neumann; empty: skip).')
  flags.DEFINE_list('train_seeds', ['0', '1', '2', '3', '4'], 'Seeds of the final-error runs.')
  flags.DEFINE_bool('skip_training', False, 'Leave out the final-error training runs.')


def main(argv):
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  config_path = pathlib.Path(config_flags.get_config_filename(FLAGS['config'])).resolve()
  overrides = config_flags.get_override_values(FLAGS['config'])
  if not FLAGS.skip_training and config_path != DIGITS_CONFIG:
    raise app.UsageError('The final-error runs (digits_results.py) train configs/digits.py; '
                         'pass --skip_training with another --config.')
  unknown = sorted(set(FLAGS.forward_modes) - set(FORWARD_MODES))
  if unknown:
    raise app.UsageError(f'Unknown --forward_modes {unknown}; expected a subset of {FORWARD_MODES}.')
  steps = sorted({int(s) for s in FLAGS.steps})
  inner_steps = [int(k) for k in FLAGS.inner_steps]
  out = pathlib.Path(FLAGS.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  timings = {}

  started = time.time()
  run_dir = FLAGS.run_dir
  if run_dir is None:
    run_dir = str(out / 'fidelity_run')
    if train_fidelity_run(config, run_dir, steps):
      timings['fidelity run training'] = time.time() - started
  saved_config = pathlib.Path(run_dir) / 'config.json'
  if saved_config.exists():
    differences = run_dir_lib.config_differences(json.loads(saved_config.read_text()),
                                              json.loads(config.to_json_best_effort()))
    if differences:
      logging.warning('--config differs from the config %s was trained with: %s', run_dir, differences)
  started = time.time()
  rows = measure_fidelity(config, run_dir, steps, forward_modes=FLAGS.forward_modes,
                          inner_steps=inner_steps, num_batches=FLAGS.num_batches,
                          half_precision=FLAGS.half_precision)
  timings['fidelity measurement'] = time.time() - started
  started = time.time()
  cost_rows = []
  if FLAGS.cost_steps > 0:
    cost_rows = measure_step_cost(config, forward_modes=FLAGS.forward_modes, inner_steps=inner_steps,
                                  steps=FLAGS.cost_steps)
    timings['step cost'] = time.time() - started
  horizon_rows = []
  if FLAGS.horizons:
    started = time.time()
    info = data.dataset_info(config.data)
    horizon_rows = hypergrad_horizon_cost.horizon_cost_rows(
        config, info.image_shape, num_classes=info.num_classes, forward_modes=FLAGS.forward_modes,
        horizons=[int(k) for k in FLAGS.horizons], repeats=max(FLAGS.cost_steps, 1),
        lr=meta_learning_rate(config, config.num_train_steps // 2))
    timings['meta-step cost against K'] = time.time() - started
  errors = None
  if not FLAGS.skip_training:
    started = time.time()
    extra = [f'--config.{name}={value}' for name, value in overrides.items()
             if name != 'hypergrad.mode']  # Each variant sets its own mode.
    errors = train_final_errors([int(s) for s in FLAGS.train_seeds], out / 'runs', extra)
    timings['final-error runs'] = time.time() - started

  header = [
      f'Command: `python -m experiments.hypergrad_ablation {" ".join(sys.argv[1:])}`',
      f'Date: {datetime.datetime.now().isoformat(timespec="seconds")}; jax {jax.__version__}; '
      f'{jax.device_count()} {jax.devices()[0].platform} device(s); host CPUs: {os.cpu_count()}; '
      f'config {config_path.name}, run {run_dir}.',
      'Wall time: ' + '; '.join(f'{name} {seconds:.0f} s' for name, seconds in timings.items()) + '.']
  markdown = render_report(header, rows, cost_rows, errors, num_batches=FLAGS.num_batches,
                           cost_steps=FLAGS.cost_steps, horizon_rows=horizon_rows)
  (out / 'ablation.md').write_text(markdown)
  write_csv(rows, FIDELITY_FIELDS, str(out / 'fidelity.csv'))
  if cost_rows:
    write_csv(cost_rows, COST_FIELDS, str(out / 'step_cost.csv'))
  plot_fidelity([r for r in rows if r['mode'] != 'exact' and r['precision'] == 'fp32'
                 and r['reference'] == 'exact'],
                str(out / 'fidelity.png'))
  print(markdown)
  print(f'Wrote ablation.md, fidelity.csv{", step_cost.csv" if cost_rows else ""} and fidelity.png '
        f'into {out}.')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
