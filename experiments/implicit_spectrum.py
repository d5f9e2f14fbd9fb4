r"""The output-space system behind `neumann` and `implicit`, formed densely on a real run's states.

On the digits batch (B_u * C = 640 outputs) the Gram matrix G = J J^T of the
unlabeled softmax outputs is small enough to build from J itself, so the damped
implicit hypergradient g_mu = (G + mu I)^{-1} J v can be solved exactly in float64
and everything the matrix-free solvers return can be measured against it:

- the spectrum of G (its largest eigenvalue, quantiles, how many are tiny: softmax
  rows sum to one, so at least B_u are zero);
- for each damping mu of `--dampings`, the condition number of G + mu I and how
  close float32 CG (`hypergrad_output_space.conjugate_gradient`, the solver training
  runs, here on the dense G) is to g_mu after n steps (cosine, relative error);
- how close K-step `neumann` (the unrolled horizon K, eigenbasis formula) is to
  each g_mu: which damping is which horizon.

A damping mu is itself a horizon: (G + mu I)^{-1} J v is the exact implicit
hypergradient of the proximal inner problem argmin L_u(theta, y) +
(mu / B_u) ||theta - theta_t||^2 (see `hypergrad_output_space`).

  python -m experiments.implicit_spectrum --run_dir=results/digits/semimeta/seed_0 \
      --out=results/implicit_spectrum
"""

import datetime
import functools
import json
import pathlib

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import semimeta_run_states
from semimeta_jax import losses
from semimeta_jax.methods import common
from semimeta_jax.methods import hypergrad
from semimeta_jax.methods import hypergrad_output_space


def dense_system(state, labeled, unlabeled):
  """(G, b): the Gram matrix J J^T [n, n] and J v [n] of the evaluation-mode meta forward.

  n = B_u * C; v = grad L_l(theta), as `hypergrad.implicit` takes it. In evaluation
  mode (running batch-norm averages, no dropout) each output depends on its own
  example only, so J is built one example at a time (C reverse passes through a
  single image each: the cost of C batch backward passes, not B_u * C).
  """
  apply_fn = functools.partial(common.eval_forward, state)

  def example_probabilities(params, image):  # The forward inside L_u, for one example.
    return jax.nn.softmax(losses.at_least_float32(apply_fn(params, image[None])))[0]

  per_example = jax.vmap(jax.jacrev(example_probabilities), in_axes=(None, 0))(
      state.params, unlabeled['image'])
  leaves = jax.tree.leaves(per_example)  # Each [B_u, C, *parameter shape].
  size = leaves[0].shape[0] * leaves[0].shape[1]
  jacobian = jnp.concatenate([leaf.reshape(size, -1) for leaf in leaves], axis=1)
  v = jax.grad(hypergrad.outer_loss)(state.params, apply_fn, labeled['image'], labeled['label'])
  flat_v = jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(v)])
  highest = jax.lax.Precision.HIGHEST
  return jnp.matmul(jacobian, jacobian.T, precision=highest), jnp.matmul(jacobian, flat_v,
                                                                           precision=highest)


def cg_iterates(gram, rhs, damping, counts):
  """{n: x_n} of the float32 CG training runs, on the dense (G + damping I) x = rhs."""
  gram32, rhs32 = jnp.asarray(gram, jnp.float32), jnp.asarray(rhs, jnp.float32)
  matvec = lambda w: gram32 @ w + damping * w
  return {n: np.asarray(hypergrad_output_space.conjugate_gradient(matvec, rhs32, iterations=n),
                        np.float64) for n in counts}


def neumann_in_eigenbasis(eigenvalues, eigenvectors, rhs, *, scale, num_terms):
  """scale * sum_{k<K} (I - scale G)^k rhs by G's eigendecomposition (float64)."""
  coefficients = eigenvectors.T @ rhs
  lam = np.maximum(eigenvalues, 0.0)
  # scale * sum_k (1 - scale lam)^k = (1 - (1 - scale lam)^K) / lam, and K * scale at lam = 0.
  with np.errstate(divide='ignore', invalid='ignore'):
    filtered = np.where(lam > 0, (1.0 - (1.0 - scale * lam) ** num_terms) / lam, scale * num_terms)
  return eigenvectors @ (filtered * coefficients)


def compare(estimate, reference):
  """{'cosine', 'relative_error'} of two float64 vectors."""
  norm = np.linalg.norm(reference)
  return {'cosine': float(estimate @ reference / (np.linalg.norm(estimate) * norm)),
          'relative_error': float(np.linalg.norm(estimate - reference) / norm)}


def analyse(gram, rhs, *, scale, dampings, cg_counts, horizons):
  """Every measurement of the module docstring for one (G, b); a JSON-able dict."""
  gram = np.asarray(gram, np.float64)
  gram = 0.5 * (gram + gram.T)  # Built from float32 products: symmetric up to rounding.
  rhs = np.asarray(rhs, np.float64)
  eigenvalues, eigenvectors = np.linalg.eigh(gram)
  top = float(eigenvalues[-1])
  result = {
      'size': int(rhs.size), 'largest_eigenvalue': top,
      'eigenvalue_quantiles': {q: float(np.quantile(eigenvalues, q)) for q in (0.1, 0.5, 0.9)},
      'eigenvalues_below': {f'{t:g}': int(np.sum(eigenvalues < t * top)) for t in (1e-6, 1e-4, 1e-2)},
      'dampings': []}
  for damping in dampings:
    solution = eigenvectors @ ((eigenvectors.T @ rhs) / (np.maximum(eigenvalues, 0.0) + damping))
    iterates = cg_iterates(gram, rhs, damping, cg_counts)
    result['dampings'].append({
        'damping': damping, 'condition_number': (top + damping) / damping,
        'cg': {n: compare(x, solution) for n, x in iterates.items()},
        'neumann': {k: compare(neumann_in_eigenbasis(eigenvalues, eigenvectors, rhs, scale=scale,
                                                     num_terms=k), solution) for k in horizons}})
  return result


def markdown(results, *, header):
  """Two tables per state: CG against g_mu, and K-step neumann against g_mu."""
  lines = [header, '']
  for r in results:
    a = r['analysis']
    lines += [f'### Step {r["step"]}, batch {r["batch"]} (alpha {r["alpha"]:.4g})', '',
              f'G is {a["size"]} x {a["size"]}; largest eigenvalue {a["largest_eigenvalue"]:.4g}; '
              f'quantiles 10/50/90 %: ' + ', '.join(f'{v:.3g}' for v in a['eigenvalue_quantiles'].values())
              + '; below 1e-6 / 1e-4 / 1e-2 of the largest: '
              + ' / '.join(str(v) for v in a['eigenvalues_below'].values()) + '.', '']
    counts = list(a['dampings'][0]['cg'])
    horizons = list(a['dampings'][0]['neumann'])
    lines += ['| damping | condition | ' + ' | '.join(f'CG {n}' for n in counts) + ' | '
              + ' | '.join(f'neumann K={k}' for k in horizons) + ' |',
              '|---|---|' + '---|' * (len(counts) + len(horizons))]
    for d in a['dampings']:
      cells = [f'{d["cg"][n]["cosine"]:.4f} / {d["cg"][n]["relative_error"]:.1e}' for n in counts]
      cells += [f'{d["neumann"][k]["cosine"]:.4f}' for k in horizons]
      lines.append(f'| {d["damping"]:g} | {d["condition_number"]:.3g} | ' + ' | '.join(cells) + ' |')
    lines.append('')
  return '\n'.join(lines)


def spectrum_results(run_dir, config, steps, *, num_batches, dampings, cg_counts, horizons,
                     verbose=False):
  """[{'step', 'batch', 'alpha', 'analysis'}] of `analyse` on the run's states and training batches."""
  build = jax.jit(dense_system)
  results = []
  for run in semimeta_run_states.run_states(run_dir, config, steps):
    lr = float(run.learning_rate)
    alpha = config.hypergrad.inner_lr if config.hypergrad.inner_lr > 0 else lr
    for i in range(num_batches):
      batch = run.input.train_batch(run.step + i)
      gram, rhs = jax.device_get(build(run.state, batch['labeled'], batch['unlabeled']))
      scale = 2.0 * alpha / config.unlabeled_batch_size
      results.append({'step': run.step, 'batch': i, 'alpha': alpha, 'analysis': analyse(
          gram, rhs, scale=scale, dampings=dampings, cg_counts=cg_counts, horizons=horizons)})
      if verbose:
        print(markdown(results[-1:], header=''), flush=True)
  return results


def _define_flags():
  flags.DEFINE_string('run_dir', None, 'A finished SemiMeta run to read (read only).', required=True)
  flags.DEFINE_string('out', 'results/implicit_spectrum', 'Directory for the tables.')
  flags.DEFINE_list('steps', ['500', '750', '1000'], 'Training steps to measure at (0: the seed\'s start).')
  flags.DEFINE_integer('num_batches', 1, 'Batches per step.')
  flags.DEFINE_list('dampings', ['1e-4', '1e-3', '0.016', '0.1', '1'], 'Dampings mu of G + mu I.')
  flags.DEFINE_list('cg_iterations', ['10', '20', '40', '80', '320'], 'CG step counts compared.')
  flags.DEFINE_list('horizons', ['1', '4', '64', '1024', '16384'], 'Neumann horizons K compared.')


def main(argv):
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  run_dir = pathlib.Path(FLAGS.run_dir)
  config = semimeta_run_states.saved_semimeta_config(run_dir)
  try:
    dampings = [float(d) for d in FLAGS.dampings]
    counts = [int(n) for n in FLAGS.cg_iterations]
    horizons = [int(k) for k in FLAGS.horizons]
  except ValueError as e:
    raise app.UsageError(f'{e}') from e
  if min(dampings) <= 0 or min(counts) < 1 or min(horizons) < 1:
    raise app.UsageError('--dampings must be > 0, --cg_iterations and --horizons >= 1.')
  results = spectrum_results(run_dir, config, [int(s) for s in FLAGS.steps],
                             num_batches=FLAGS.num_batches, dampings=dampings, cg_counts=counts,
                             horizons=horizons, verbose=True)
  header = (f'Dense output-space system of run {run_dir} (evaluation-mode meta forward). Cells: '
            f'cosine / relative error of float32 CG after n steps against the float64 solution '
            f'g_mu = (G + mu I)^-1 J v, then the cosine of K-step neumann with g_mu; '
            f'{datetime.datetime.now().isoformat(timespec="seconds")}, jax {jax.__version__}.')
  out = pathlib.Path(FLAGS.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'implicit_spectrum.md').write_text(markdown(results, header=header))
  (out / 'implicit_spectrum.json').write_text(json.dumps(results, indent=1))
  print(f'Wrote {out / "implicit_spectrum.md"}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
