r"""Meta Pseudo Labels: each teacher feedback against the exact meta-gradient along a real run, and its cost.

1. Fidelity. One Meta Pseudo Labels run of `--config` (digits, `mpl_exact` by default) is
   trained with a checkpoint at every step in `--steps` (or an existing run is read from
   `--run_dir`). At each of those steps the state is restored, the batches that step and
   the next ones would train on are rebuilt (`data.build_input(start_step=step)`), and the
   teacher-parameter gradient of the feedback term alone (`mpl.feedback_gradient`: the
   step's own forwards, labels and student step, without the supervised loss) is computed
   by each variant on each batch, with the same state and dropout draws:
     exact             the reference: soft labels, the engine's `exact` through the student's step;
     jvp, finite_difference, first_order   the engine's other modes for the same objective;
     paper (+1, -1)    one sampled label draw, h with the derivation's sign and its opposite;
     paper mean of N   the +1 estimate averaged over `--samples` label draws;
     released_code     the released term (zero gradient: its norm ratio is 0).
   The table gives the cosine with `exact` and the norm ratio, averaged over
   `--num_batches` batches. The paper's estimate targets 1/B_u times the soft-label
   meta-gradient to first order (tests/test_mpl_feedback.py), so read its cosine.
2. Step cost: compile time and median time of the full compiled training step of each
   variant on a synthetic batch (`benchmark_step.measure_step`).

Writes mpl_ablation.md, fidelity.csv and step_cost.csv into `--out` and prints the tables:

  python -m experiments.mpl_ablation --out=results/mpl_ablation --config.data.data_dir=/tmp/tfds
"""

import datetime
import functools
import os
import pathlib
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from experiments import benchmark_step
from experiments.hypergrad_ablation import train_fidelity_run
from experiments.hypergrad_ablation import write_csv
from semimeta_jax import checkpoint
from semimeta_jax import data
from semimeta_jax import models
from semimeta_jax import parallel
from semimeta_jax import train
from semimeta_jax.methods import mpl

REPO = pathlib.Path(__file__).resolve().parents[1]
DIGITS_CONFIG = REPO / 'configs' / 'digits.py'
FIDELITY_FIELDS = ('step', 'variant', 'cosine', 'norm_ratio', 'batches')
COST_FIELDS = ('variant', 'compile_s', 'median_step_ms', 'compiled_mib')
# The step-cost rows: {name: mpl fields}.
COST_VARIANTS = {
    'exact (K=1)': {'feedback': 'exact'},
    'exact (K=2)': {'feedback': 'exact', 'inner_steps': 2},
    'jvp': {'feedback': 'exact', 'hypergrad_mode': 'jvp'},
    'finite_difference': {'feedback': 'exact', 'hypergrad_mode': 'finite_difference'},
    'paper': {'feedback': 'paper', 'soft_labels': False},
    'released_code': {'feedback': 'released_code'},
    'none (teacher loss alone)': {'feedback': 'none'},
}


def variant(config, **fields):
  """A copy of `config` with the `mpl` fields replaced."""
  config = config.copy_and_resolve_references()
  for name, value in fields.items():
    config.mpl[name] = value
  return config


def _flat(tree):
  return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(tree)])


def _compare(estimate, exact):
  tiny = jnp.finfo(exact.dtype).tiny
  exact_norm = jnp.linalg.norm(exact)
  return {'cosine': jnp.vdot(estimate, exact) / jnp.maximum(jnp.linalg.norm(estimate) * exact_norm, tiny),
          'norm_ratio': jnp.linalg.norm(estimate) / jnp.maximum(exact_norm, tiny)}


def fidelity(state, batch, *, config, samples: int):
  """{variant: {'cosine', 'norm_ratio'}} of each feedback against `exact`, on one batch."""
  gradient = lambda cfg, key=None: _flat(mpl.feedback_gradient(state, batch, config=cfg, label_key=key))
  exact_config = variant(config, feedback='exact', soft_labels=True, hypergrad_mode='exact', inner_steps=1)
  reference = gradient(exact_config)
  rows = {mode: _compare(gradient(variant(exact_config, hypergrad_mode=mode)), reference)
          for mode in ('jvp', 'finite_difference', 'first_order')}
  paper = variant(config, feedback='paper', soft_labels=False, h_sign=1.0)
  keys = jax.random.split(jax.random.fold_in(state.step_key(), 0x3E1), samples)
  draws = jax.lax.map(lambda key: gradient(paper, key), keys)
  rows['paper (h_sign +1, one draw)'] = _compare(draws[0], reference)
  rows['paper (h_sign -1, one draw)'] = _compare(gradient(variant(paper, h_sign=-1.0), keys[0]), reference)
  rows[f'paper (h_sign +1, mean of {samples} draws)'] = _compare(jnp.mean(draws, axis=0), reference)
  rows['released_code'] = _compare(gradient(variant(config, feedback='released_code', soft_labels=True)),
                                   reference)
  return rows


def measure_fidelity(config, run_dir: str, steps, *, num_batches: int, samples: int):
  """FIDELITY_FIELDS rows at each step of `steps` that `run_dir` has a state for (0: the initial one)."""
  info = data.dataset_info(config.data)
  mesh = parallel.make_mesh()
  fresh = train.create_train_state(config, models.get_model(config, info.num_classes), info.image_shape,
                                   mesh)
  checkpointer = checkpoint.Checkpointer(run_dir, keep=max(config.keep_checkpoints, 1), async_save=False,
                                         read_only=True)
  saved = set(checkpointer.all_steps())
  compiled = jax.jit(functools.partial(fidelity, config=config, samples=samples))
  rows = []
  for step in steps:
    if step and step not in saved:
      logging.warning('No checkpoint %d in %s (it has %s); skipping it.', step, run_dir, sorted(saved))
      continue
    state = checkpointer.restore(fresh, step) if step else fresh
    inp = data.build_input(config, run_dir, start_step=step, mesh=mesh)
    per_batch = jax.device_get([compiled(state, inp.train_batch(step + i)) for i in range(num_batches)])
    for name in per_batch[0]:
      rows.append({'step': step, 'variant': name, 'batches': num_batches,
                   **{m: float(np.mean([b[name][m] for b in per_batch])) for m in ('cosine', 'norm_ratio')}})
    logging.info('Fidelity measured at step %d.', step)
  checkpointer.close()
  return rows


def measure_step_cost(config, *, steps: int):
  """COST_FIELDS rows: the full compiled training step of each variant of COST_VARIANTS."""
  info = data.dataset_info(config.data)
  rows = []
  for name, fields in COST_VARIANTS.items():
    row = benchmark_step.measure_step(variant(config, **fields), num_classes=info.num_classes,
                                      image_shape=info.image_shape, steps=steps, warmup_steps=2,
                                      seed=config.seed, name=name)
    rows.append({'variant': name, **{field: row[field] for field in COST_FIELDS[1:]}})
  return rows


def fidelity_table(rows) -> str:
  """Markdown: a row per variant, a column per step, 'cosine / norm ratio' in each cell."""
  steps = sorted({r['step'] for r in rows})
  names = list(dict.fromkeys(r['variant'] for r in rows))
  cells = {(r['variant'], r['step']): f'{r["cosine"]:.3f} / {r["norm_ratio"]:.3g}' for r in rows}
  lines = ['| feedback | ' + ' | '.join(f'step {s}' for s in steps) + ' |',
           '|---|' + '---|' * len(steps)]
  lines += [f'| {name} | ' + ' | '.join(cells.get((name, s), '') for s in steps) + ' |' for name in names]
  return '\n'.join(lines)


def cost_table(rows) -> str:
  lines = ['| variant | compile s | median step ms | compiled MiB |', '|---|---|---|---|']
  lines += [f'| {r["variant"]} | {r["compile_s"]:.1f} | {r["median_step_ms"]:.1f} | {r["compiled_mib"]:.1f} |'
            for r in rows]
  return '\n'.join(lines)


def _define_flags():
  """The command line; defined on demand so that importing this module defines no flags."""
  config_flags.DEFINE_config_file('config', f'{DIGITS_CONFIG}:mpl_exact', 'Run configuration (method mpl).')
  flags.DEFINE_string('out', 'results/mpl_ablation', 'Directory for the tables, CSVs and the run.')
  flags.DEFINE_string('run_dir', None, 'A run of --config to read checkpoints from (default: train one '
                      'into <out>/fidelity_run).')
  flags.DEFINE_list('steps', ['100', '500', '1000'], 'Training steps to measure at '
                    '(at step 0 the warm-up\'s learning rate, hence every feedback, is 0).')
  flags.DEFINE_integer('num_batches', 4, 'Batches averaged per step.')
  flags.DEFINE_integer('samples', 16, 'Label draws averaged in the paper row.')
  flags.DEFINE_integer('cost_steps', 10, 'Timed steps per variant for the step cost (0: skip).')


def main(argv):
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  if config.method != 'mpl':
    raise app.UsageError(f'--config must train Meta Pseudo Labels (method mpl), not {config.method!r}.')
  steps = sorted({int(s) for s in FLAGS.steps})
  out = pathlib.Path(FLAGS.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  timings = {}
  started = time.time()
  run_dir = FLAGS.run_dir or str(out / 'fidelity_run')
  if FLAGS.run_dir is None and train_fidelity_run(config, run_dir, steps):
    timings['fidelity run training'] = time.time() - started
  started = time.time()
  rows = measure_fidelity(config, run_dir, steps, num_batches=FLAGS.num_batches, samples=FLAGS.samples)
  timings['fidelity measurement'] = time.time() - started
  cost_rows = []
  if FLAGS.cost_steps > 0:
    started = time.time()
    cost_rows = measure_step_cost(config, steps=FLAGS.cost_steps)
    timings['step cost'] = time.time() - started
  sections = [
      f'Command: `python -m experiments.mpl_ablation {" ".join(sys.argv[1:])}`',
      f'Date: {datetime.datetime.now().isoformat(timespec="seconds")}; jax {jax.__version__}; '
      f'{jax.device_count()} {jax.devices()[0].platform} device(s); host CPUs: {os.cpu_count()}; run {run_dir} '
      f'(feedback {config.mpl.feedback}).',
      'Wall time: ' + '; '.join(f'{name} {seconds:.0f} s' for name, seconds in timings.items()) + '.',
      '## Teacher feedback against the exact meta-gradient: cosine / norm ratio\n\nThe gradient of the '
      f'feedback term alone in the teacher\'s parameters, mean over {FLAGS.num_batches} batches per step '
      '(the batches the run trains on from that step). `exact` differentiates L_l(theta~) through the '
      'student\'s virtual step on the soft labels; the `paper` rows sample hard labels (the student\'s step '
      'is then on those) and scale grad CE(y^, T) by h. Its expectation targets 1/B_u times the exact '
      'gradient to first order, so its norm ratio is about 1/B_u by construction and its cosine is the '
      'measure. The released term\'s gradient is zero.\n\n' + fidelity_table(rows)]
  if cost_rows:
    sections.append(f'## Training-step cost\n\nFull compiled step (synthetic batch), median of '
                    f'{FLAGS.cost_steps} steps; compiled MiB from XLA memory_analysis.\n\n' + cost_table(cost_rows))
  markdown = '\n\n'.join(sections) + '\n'
  (out / 'mpl_ablation.md').write_text(markdown)
  write_csv(rows, FIDELITY_FIELDS, str(out / 'fidelity.csv'))
  if cost_rows:
    write_csv(cost_rows, COST_FIELDS, str(out / 'step_cost.csv'))
  print(markdown)
  print(f'Wrote mpl_ablation.md, fidelity.csv{", step_cost.csv" if cost_rows else ""} into {out}.')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
