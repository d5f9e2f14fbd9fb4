r"""How many conjugate-gradient steps the `implicit` hypergradient needs, on a real run's states.

`implicit` solves (J J^T + damping I) g = J v by a fixed number of CG steps
(`hypergrad.cg_iterations`). This restores a finished run's checkpoints, rebuilds the
batches it trained on at each of `--steps`, and compares g after each count of
`--iterations` with g after the largest count (cosine and relative error, mean over
`--num_batches`), in the run's own meta forward mode and damping. Raw hypergradients
are compared (`meta_step_scale='none'`), so the relative error includes scale.

  python -m experiments.implicit_convergence --run_dir=results/digits/semimeta/seed_0 \
      --out=results/implicit_convergence
"""

import datetime
import functools
import pathlib

from absl import app
from absl import flags
import jax
import numpy as np

from experiments import hypergrad_fidelity
from experiments import semimeta_run_states
from semimeta_jax.methods import common
from semimeta_jax.methods import semimeta


def implicit_hypergradients(state, batch, lr, *, config, iterations, loop_unroll: int = 1):
  """{n: g} of `implicit` after each CG count n of `iterations`, with the training step's dropout draw.

  `loop_unroll` CG steps run per loop iteration (at most n): the same values, faster on a CPU.
  """
  grads = {}
  for count in iterations:
    variant = config.copy_and_resolve_references()
    variant.hypergrad.update(mode='implicit', cg_iterations=count, meta_step_scale='none',
                             loop_unroll=min(count, loop_unroll))
    _, grads[count], _ = semimeta.meta_pseudo_labels(
        state, batch['labeled'], batch['unlabeled'], lr=lr,
        key=state.step_key(common.DROPOUT_META), config=variant)
  return grads


def convergence_rows(grads_per_batch, *, step: int, iterations):
  """One row per CG count: cosine and relative error against the largest count, mean over batches."""
  reference = max(iterations)
  rows = []
  for count in iterations:
    compared = [jax.device_get(hypergrad_fidelity.compare(grads[count], grads[reference]))
                for grads in grads_per_batch]
    rows.append({'step': step, 'cg_iterations': count, 'reference_iterations': reference,
                 'cosine': float(np.mean([c['cosine'] for c in compared])),
                 'relative_error': float(np.mean([c['relative_error'] for c in compared]))})
  return rows


def convergence_table(rows) -> str:
  """Markdown: a line per CG count, a 'cosine / relative error' cell per step."""
  steps = sorted({r['step'] for r in rows})
  cells = {(r['cg_iterations'], r['step']): r for r in rows}
  lines = ['| CG steps | ' + ' | '.join(f'step {s}' for s in steps) + ' |', '|---|' + '---|' * len(steps)]
  for count in sorted({r['cg_iterations'] for r in rows}):
    text = [f'{cells[count, s]["cosine"]:.5f} / {cells[count, s]["relative_error"]:.2e}'
            if (count, s) in cells else '-' for s in steps]
    lines.append(f'| {count} | ' + ' | '.join(text) + ' |')
  return '\n'.join(lines)


def convergence_results(run_dir, config, steps, *, num_batches, iterations, loop_unroll):
  """`convergence_rows` of each step of `steps` of the run, over its first `num_batches` batches there."""
  measure = jax.jit(functools.partial(implicit_hypergradients, config=config, iterations=iterations,
                                      loop_unroll=loop_unroll))
  rows = []
  for run in semimeta_run_states.run_states(run_dir, config, steps):
    grads = [measure(run.state, run.input.train_batch(run.step + i), run.learning_rate)
             for i in range(num_batches)]
    rows += convergence_rows(grads, step=run.step, iterations=iterations)
  return rows


def _define_flags():
  flags.DEFINE_string('run_dir', None, 'A finished SemiMeta run to read (read only).', required=True)
  flags.DEFINE_string('out', 'results/implicit_convergence', 'Directory for the table.')
  flags.DEFINE_list('steps', ['0', '500', '1000'], 'Training steps to measure at (0: the seed\'s start).')
  flags.DEFINE_list('iterations', ['5', '10', '20', '40', '160'], 'CG step counts; the largest is the reference.')
  flags.DEFINE_integer('num_batches', 2, 'Batches averaged per step.')
  flags.DEFINE_integer('loop_unroll', 20, 'CG steps per loop iteration (hypergrad.loop_unroll).')


def main(argv):
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  run_dir = pathlib.Path(FLAGS.run_dir)
  config = semimeta_run_states.saved_semimeta_config(run_dir)
  iterations = sorted({int(n) for n in FLAGS.iterations})
  if iterations[0] < 1:
    raise app.UsageError(f'--iterations must be >= 1, got {iterations}.')
  rows = convergence_results(run_dir, config, [int(s) for s in FLAGS.steps],
                             num_batches=FLAGS.num_batches, iterations=iterations,
                             loop_unroll=FLAGS.loop_unroll)
  header = (f'`implicit` after n CG steps against {iterations[-1]} steps, cosine / relative error, mean '
            f'over {FLAGS.num_batches} batches; run {run_dir} (meta forward '
            f'{config.hypergrad.forward_mode}, damping {config.hypergrad.cg_damping}); '
            f'{datetime.datetime.now().isoformat(timespec="seconds")}, jax {jax.__version__}.')
  markdown = f'{header}\n\n{convergence_table(rows)}\n'
  out = pathlib.Path(FLAGS.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'implicit_convergence.md').write_text(markdown)
  print(markdown)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
