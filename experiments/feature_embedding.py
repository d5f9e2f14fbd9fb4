r"""A 2-D t-SNE embedding of the pooled test features of finished runs, one panel per run.

  python -m experiments.feature_embedding --out=docs/digits_features.png \
      --labels='Labeled only,Mean Teacher,SemiMeta' \
      --runs=results/digits/labeled_only/seed_0,results/digits/mean_teacher/seed_0,results/digits/semimeta/seed_0

Each run directory is a finished `semimeta_jax.main` workdir. Its saved config
(`config.json`, read in today's field names as a resume reads it) rebuilds the
model, the state and the data exactly as the training loop does; the newest intact
checkpoint is restored, and the weight set the run reports (its summary's
`reported_prefix`: the EMA teacher of Mean Teacher, the average of fast-SWA, else
the raw weights) is run in evaluation mode over every test example once, in the
loop's own evaluation batches (padded rows dropped). The globally pooled features
and the logits come from that one forward. The test error recomputed from those
logits must equal the summary's final error (to 1e-6 as a fraction): the check
that the weights read are the ones the run reported. Then
`TSNE(n_components=2, init='pca', random_state=0, perplexity=30)` per run; points
are coloured by true class. A table of what was read is printed.
"""

import argparse
import dataclasses
import functools
import json
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # Before TensorFlow loads: no start-up notices.

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import matplotlib  # pylint: disable=g-import-not-at-top,wrong-import-position

matplotlib.use('Agg')  # Files only; no display is needed or assumed.
from matplotlib import lines as mlines  # pylint: disable=g-import-not-at-top,wrong-import-position
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from sklearn import manifold  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position
from semimeta_jax import checkpoint  # pylint: disable=g-import-not-at-top,wrong-import-position
from semimeta_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from semimeta_jax import data  # pylint: disable=g-import-not-at-top,wrong-import-position
from semimeta_jax import errors  # pylint: disable=g-import-not-at-top,wrong-import-position
from semimeta_jax import losses  # pylint: disable=g-import-not-at-top,wrong-import-position
from semimeta_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from semimeta_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from semimeta_jax import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
from semimeta_jax import run_dir  # pylint: disable=g-import-not-at-top,wrong-import-position
from semimeta_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from semimeta_jax import validation  # pylint: disable=g-import-not-at-top,wrong-import-position
from semimeta_jax import workdir_files  # pylint: disable=g-import-not-at-top,wrong-import-position
from semimeta_jax.methods import common  # pylint: disable=g-import-not-at-top,wrong-import-position

PERPLEXITY = 30.0
# The recomputed and the reported error are counts over the same examples: they agree exactly,
# up to the float rounding of the summary's percentage.
ERROR_TOLERANCE = 1e-6


class RunDirectoryError(errors.UserError, ValueError):
  """A run directory that is not a finished run this script can read."""


class WeightsMismatchError(errors.UserError, RuntimeError):
  """The weights read do not reproduce the error the run reported."""


@dataclasses.dataclass(frozen=True)
class RunFeatures:
  """What one run's test forward gave.

  Attributes:
    features: float [N, D] pooled features, one row per test example, in split order.
    labels: int [N] true classes.
    logits: float [N, num_classes] from the same forward.
    prefix: the evaluated weight set ('eval', 'eval_ema', ...).
    step: the restored checkpoint's step.
    error: the top-1 test error recomputed from `logits`, as a fraction.
    reported_error: summary.json's final_error_top1, as a fraction.
    num_classes: the dataset's class count.
  """
  features: np.ndarray
  labels: np.ndarray
  logits: np.ndarray
  prefix: str
  step: int
  error: float
  reported_error: float
  num_classes: int


def read_finished_summary(workdir: str) -> dict:
  """summary.json of a finished run; raises `RunDirectoryError` for anything else."""
  path = os.path.join(workdir, metrics_lib.SUMMARY_FILE)
  for name in (metrics_lib.SUMMARY_FILE, run_dir.CONFIG_FILE):
    if not os.path.isfile(os.path.join(workdir, name)):
      raise RunDirectoryError(f'{workdir} has no {name}: give the workdir of a finished '
                              'semimeta_jax.main run.')
  summary = workdir_files.read_json_object(path, fix='give the workdir of a finished run')
  if not summary.get('completed') or summary.get('final_error_top1') is None:
    raise RunDirectoryError(f'{workdir} holds an unfinished run (step {summary.get("steps")}, no final '
                            'test error): rerun its training command to finish it first.')
  return summary


def _has_field(config, name: str) -> bool:
  """Whether the dotted field `name` is a field of `config` (an update would add it silently)."""
  *parents, leaf = name.split('.')
  for parent in parents:
    if not isinstance(config.get(parent), ml_collections.ConfigDict):
      return False
    config = config[parent]
  return leaf in config


def saved_config(workdir: str, data_dir: str | None = None):
  """The run's config.json as a config, in today's field names (`run_dir.upgrade_saved`).

  Args:
    workdir: the run directory.
    data_dir: where the dataset is now, if not where the run read it (a free field).
  """
  config = default.get_config()
  saved = workdir_files.read_json_object(os.path.join(workdir, run_dir.CONFIG_FILE))
  fields = run_dir.upgrade_saved(saved, json.loads(config.to_json_best_effort()))
  unknown = sorted(name for name in fields if not _has_field(config, name))
  if unknown:
    raise RunDirectoryError(f'{workdir}/{run_dir.CONFIG_FILE} has fields this version does not know '
                            f'({", ".join(unknown)}): it was written by another version.')
  config.update_from_flattened_dict(fields)  # Lists saved for tuple fields become tuples again.
  if data_dir:
    config.data.data_dir = data_dir
  return config


def _headline_weight_set(method, summary, workdir):
  prefix = summary.get('reported_prefix', method.headline)
  if prefix != method.headline:
    raise RunDirectoryError(f'{workdir} reported the weights {prefix!r}; its config reports '
                            f'{method.headline!r}: its summary.json is of another config.')
  return next(ws for ws in method.weight_sets() if ws.prefix == prefix)


def _feature_step(state, batch, *, select):
  """Logits, pooled features and top-1 correctness of one global batch, from one forward."""
  params, stats = select(state)
  logits, features = common.eval_forward_with_features(state, params, batch['image'],
                                                       batch_stats=stats)
  return {'logits': logits, 'features': features,
          'correct': losses.topk_correct(logits, batch['label'], 1)}


def extract_features(workdir: str, *, data_dir: str | None = None) -> RunFeatures:
  """Restores a finished run and runs its reported weights over its test split once.

  Args:
    workdir: a finished run directory.
    data_dir: where the dataset is now, if not where the run read it.

  Returns:
    Its `RunFeatures`.

  Raises:
    RunDirectoryError: not a finished run, or its checkpoint is not the reported step.
    WeightsMismatchError: the recomputed test error differs from the summary's.
  """
  if jax.process_count() > 1:
    raise RunDirectoryError('feature_embedding runs in one process (it gathers every feature).')
  summary = read_finished_summary(workdir)
  config = saved_config(workdir, data_dir)
  # As `train.train_and_evaluate` builds the run.
  method = validation.validate_config(config)
  info = data.dataset_info(config.data)
  mesh = parallel.make_mesh()
  state = train.create_train_state(config, models.get_model(config, info.num_classes),
                                   info.image_shape, mesh, num_train=info.num_train,
                                   num_classes=info.num_classes, method=method)
  with checkpoint.Checkpointer(workdir, keep=max(config.keep_checkpoints, 1),
                               read_only=True) as checkpointer:
    state, step = checkpointer.restore_newest_intact(state)
  if step != summary['steps']:
    raise RunDirectoryError(f'{workdir}: the newest intact checkpoint is step {step}, the summary '
                            f'reports step {summary["steps"]}: the reported weights are not saved.')
  weight_set = _headline_weight_set(method, summary, workdir)
  if not weight_set.ready(state):
    raise RunDirectoryError(f'{workdir}: the weight set {weight_set.prefix!r} holds no weights yet.')
  inp = data.build_input(config, workdir, start_step=step, mesh=mesh,
                         uses_unlabeled=method.uses_unlabeled)
  forward = parallel.jit_eval_step(functools.partial(_feature_step, select=weight_set.select), mesh)
  parts = {'features': [], 'logits': [], 'correct': [], 'labels': []}
  for batch in inp.eval_batches():  # This process's padded batches: here, every one.
    out = jax.device_get(forward(state, parallel.to_global(batch, mesh)))
    keep = np.asarray(batch['mask'])
    for name in ('features', 'logits', 'correct'):
      parts[name].append(np.asarray(out[name])[keep])
    parts['labels'].append(np.asarray(batch['label'])[keep])
  rows = {name: np.concatenate(values) for name, values in parts.items()}
  if len(rows['labels']) != summary['num_eval_examples']:
    raise WeightsMismatchError(f'{workdir}: {len(rows["labels"])} test examples read, the run '
                               f'evaluated {summary["num_eval_examples"]}.')
  result = RunFeatures(features=rows['features'], labels=rows['labels'], logits=rows['logits'],
                       prefix=weight_set.prefix, step=int(step),
                       error=float(1.0 - rows['correct'].astype(np.float64).mean()),
                       reported_error=float(summary['final_error_top1']) / 100.0,
                       num_classes=info.num_classes)
  if abs(result.error - result.reported_error) > ERROR_TOLERANCE:
    raise WeightsMismatchError(
        f'{workdir}: the {weight_set.prefix} weights of step {step} give test error '
        f'{100 * result.error:.4f}%, its summary.json reports {100 * result.reported_error:.4f}%: '
        'they are not the weights (or not the test data) the run evaluated.')
  return result


def embed(features: np.ndarray, *, perplexity: float = PERPLEXITY) -> np.ndarray:
  """[N, 2] t-SNE embedding of [N, D] features (PCA start, seed 0: repeatable)."""
  tsne = manifold.TSNE(n_components=2, init='pca', random_state=0, perplexity=perplexity)
  return tsne.fit_transform(np.asarray(features, np.float64))


def plot_embeddings(panels, out: str):
  """One scatter per run, coloured by true class, with one class legend; saves `out`.

  Args:
    panels: (title, [N, 2] embedding, [N] labels, num_classes) per run.
    out: the PNG path.
  """
  num_classes = max(panel[3] for panel in panels)
  colours = plt.get_cmap('tab10' if num_classes <= 10 else 'tab20' if num_classes <= 20 else 'turbo')
  colour = lambda c: colours(c if num_classes <= 20 else c / max(num_classes - 1, 1))
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.4), squeeze=False)
  for ax, (title, points, labels, _) in zip(axes[0], panels):
    ax.scatter(points[:, 0], points[:, 1], c=[colour(c) for c in labels], s=7, linewidths=0)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
  if num_classes <= 20:  # Beyond that a legend is a wall of swatches.
    handles = [mlines.Line2D([], [], marker='o', linestyle='', color=colour(c), label=str(c))
               for c in range(num_classes)]
    fig.legend(handles=handles, title='class', loc='center right', frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 0.6 / (4.2 * len(panels)), 1))
  else:
    fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=150)
  plt.close(fig)


def check_arguments(runs, labels, out: str, perplexity: float) -> list[dict]:
  """Every argument and run directory checked before anything is computed; their summaries."""
  if len(labels) != len(runs):
    raise RunDirectoryError(f'{len(labels)} --labels for {len(runs)} --runs.')
  if not runs:
    raise RunDirectoryError('--runs names no run directory.')
  if not out.lower().endswith('.png'):
    raise RunDirectoryError(f'--out={out!r}: the figure is a PNG; give a path ending in .png.')
  summaries = [read_finished_summary(workdir) for workdir in runs]
  for workdir, summary in zip(runs, summaries):
    # t-SNE needs more points than its perplexity.
    if summary['num_eval_examples'] <= perplexity:
      raise RunDirectoryError(f'{workdir} evaluated {summary["num_eval_examples"]} test examples: '
                              f't-SNE needs more than --perplexity={perplexity:g}.')
  return summaries


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--runs', required=True, help='comma-separated finished run directories')
  parser.add_argument('--labels', required=True, help='comma-separated title per run')
  parser.add_argument('--out', default='features.png', help='output PNG')
  parser.add_argument('--data_dir', default=None,
                      help="where the dataset is, if not where the runs read it (their config's)")
  parser.add_argument('--perplexity', type=float, default=PERPLEXITY)
  args = parser.parse_args(argv)
  runs = [entry for entry in args.runs.split(',') if entry]
  labels = [entry for entry in args.labels.split(',') if entry]
  with cli.user_errors_exit():
    check_arguments(runs, labels, args.out, args.perplexity)
    results = [extract_features(workdir, data_dir=args.data_dir) for workdir in runs]
  panels = [(f'{label}\ntest error {100 * r.reported_error:.2f}%',
             embed(r.features, perplexity=args.perplexity), r.labels, r.num_classes)
            for label, r in zip(labels, results)]
  plot_embeddings(panels, args.out)
  print(f'{"run":<20} {"weights":<9} {"step":>7} {"test examples":>13} {"feature dim":>11} '
        f'{"error % (recomputed)":>20} {"error % (summary)":>17}  directory')
  for label, workdir, r in zip(labels, runs, results):
    print(f'{label:<20} {r.prefix:<9} {r.step:>7} {len(r.labels):>13} {r.features.shape[1]:>11} '
          f'{100 * r.error:>20.4f} {100 * r.reported_error:>17.4f}  {workdir}')
  print(f'Wrote {args.out}')
  return results


if __name__ == '__main__':
  main(sys.argv[1:])
