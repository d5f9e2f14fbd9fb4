"""The digits results table: every method (and hypergradient mode) over several seeds.

Each run is `python -m semimeta_jax.main --config=configs/digits.py` in its own
process, with the variant's overrides, into `<out>/<variant>/seed_<k>`. A run whose
summary.json says it completed with exactly the requested config is reused, so the
script resumes where it stopped; one that was run with another config (say, another
label budget) is an error rather than a silent mix of two experiments. It prints a markdown table of test error (mean and standard deviation
over seeds) and writes it, with a CSV of every run, into `--out`.

  python -m experiments.digits_results --out=results/digits \
      --variants=labeled_only,semimeta,fully_supervised --seeds=0,1,2,3,4

The table's protocol (`semimeta_jax/result_protocol.py`; stated above every table): the final
test error, and the median test error of the last 20 evaluations (the FixMatch papers'); with
`--validation_size=N` each run holds N training examples out of its unlabeled pool
(`config.data.validation_size`) and the table adds the test error at the step of the lowest
validation error. No column picks a step on the test set. Runs with a validation split are
other runs: give them their own `--out`.

The comparison methods' settings are their papers' (each method's digits preset,
`PRESETS` in semimeta_jax/methods/, also runnable as --config=configs/digits.py:NAME), scaled to 8x8 digits as the
Pi-model's and Mean Teacher's were: consistency weights and ramps as those two
(sigmoid ramp, w_max 10, 1-pixel shifts); Temporal Ensembling's alpha = 0.6 as
published; VAT's weight 1 without ramp and eps = 2.0, MNIST's radius (standardised
8x8 digits have about an MNIST digit's L2 norm, ~8 against ~9), one power
iteration with xi -> 0 taken exactly (`vat.xi=0`: the Hessian-vector product; the
paper's xi = 1e-6 is below float32 rounding here, see methods/vat.py); VAT+Ent adds the entropy at weight 1; fast-SWA appends 3 cosine
cycles of 150 steps (the paper's 30-epoch cycles after 180 epochs, in proportion
to this 1000-step main run) from lr 0.05 down to the main schedule's final 0.001,
averaging every 25 steps (about one unlabeled epoch, as the paper's per-epoch
averages) and recomputing batch-norm statistics over 23 batches (one epoch).

The estimator ablation (`semimeta_*_train`, `semimeta_exact_k*`) trains with the
meta forward in training mode, where theta~ != theta and the estimators differ
(in evaluation mode each virtual step leaves theta unchanged, but d theta_K / d ytil still
accumulates: K = 2 gives about 1.9x the K = 1 hypergradient at alpha = 0.1; `neumann`
computes any K there at the memory of K = 1). The horizon ablation (`semimeta_eval_k*`,
`semimeta_implicit`) stays in the official evaluation mode and rescales each hypergradient
to the K = 1 one's norm, so that only its direction differs from K = 1's; the
`*_official_beta` rows keep the official beta, which assumes the K = 1 scale.
"""

import argparse
import csv
import functools
import json
import os
import pathlib
import subprocess
import sys
import time

from absl import flags
import ml_collections
from ml_collections import config_flags
import numpy as np

from experiments.row_labels import LABELS
from semimeta_jax import methods
from semimeta_jax import metrics as metrics_lib
from semimeta_jax import result_protocol
from semimeta_jax import run_dir

# Where `configs/` is: the runs read configs/digits.py from there.
REPO = pathlib.Path(__file__).resolve().parents[1]

def _preset_flags(dataset, name, *extra):
  """The command-line overrides of a method's preset for `dataset` (methods/*.py `PRESETS`), then `extra`."""
  overrides = methods.presets(dataset)[name]
  return [f'--config.{field}={value}' for field, value in overrides.items()] + list(extra)


@functools.cache
def variants(dataset='digits'):
  """Variant -> command-line overrides of configs/<dataset>.py.

  A method's preset for `dataset` (its papers' settings, declared beside the method), and for
  the SemiMeta ablations the estimator's fields on top of the `semimeta` preset.
  """
  _preset = functools.partial(_preset_flags, dataset)
  return {
      **{name: _preset(name) for name in methods.presets(dataset)},
      # The config's own hypergradient mode, the official finite difference, is the 'semimeta' preset.
      'semimeta_exact': _preset('semimeta', '--config.hypergrad.mode=exact'),
      'semimeta_first_order': _preset('semimeta', '--config.hypergrad.mode=first_order'),
      'semimeta_jvp': _preset('semimeta', '--config.hypergrad.mode=jvp'),
      # The estimator ablation: training-mode meta forward, where the estimators differ.
      'semimeta_train': _preset('semimeta', '--config.hypergrad.forward_mode=train'),
      'semimeta_exact_train': _preset('semimeta', '--config.hypergrad.mode=exact',
                                      '--config.hypergrad.forward_mode=train'),
      'semimeta_first_order_train': _preset('semimeta', '--config.hypergrad.mode=first_order',
                                            '--config.hypergrad.forward_mode=train'),
      'semimeta_jvp_train': _preset('semimeta', '--config.hypergrad.mode=jvp',
                                    '--config.hypergrad.forward_mode=train'),
      'semimeta_exact_k2_train': _preset('semimeta', '--config.hypergrad.mode=exact',
                                         '--config.hypergrad.inner_steps=2',
                                         '--config.hypergrad.forward_mode=train'),
      'semimeta_exact_k3_train': _preset('semimeta', '--config.hypergrad.mode=exact',
                                         '--config.hypergrad.inner_steps=3',
                                         '--config.hypergrad.forward_mode=train'),
      # The horizon ablation in the official evaluation-mode meta forward: K = 1 is
      # `semimeta_exact`; K = 2, 4 by `neumann` (equal to unrolled `exact` there, tested),
      # and the K -> infinity limit. Each hypergradient is rescaled to the K = 1 one's norm
      # (hypergrad.match_first_step_norm) so that the rows differ only in direction; the
      # `_official_beta` rows take the official beta as it is (about K times the step).
      # Loops unrolled: same values, ~10x faster on XLA:CPU (docs/hypergrad_horizon_cost.md).
      **{f'semimeta_eval_k{k}': _preset('semimeta', '--config.hypergrad.mode=neumann',
                                        f'--config.hypergrad.inner_steps={k}',
                                        f'--config.hypergrad.loop_unroll={k}',
                                        '--config.hypergrad.meta_step_scale=first_step_norm')
         for k in (2, 4)},
      **{f'semimeta_eval_k{k}_official_beta': _preset('semimeta', '--config.hypergrad.mode=neumann',
                                                      f'--config.hypergrad.inner_steps={k}',
                                                      f'--config.hypergrad.loop_unroll={k}')
         for k in (2, 4)},
      'semimeta_implicit': _preset('semimeta', '--config.hypergrad.mode=implicit',
                                   '--config.hypergrad.loop_unroll=20',
                                   '--config.hypergrad.meta_step_scale=first_step_norm'),
      # K = 1 with a longer pseudo-label step: the official beta is lr * B_u / alpha = B_u = 64 with
      # alpha = lr; K = 2 and 4 with the official beta step about 2 and 4 times as far.
      'semimeta_exact_beta2x': _preset('semimeta', '--config.hypergrad.mode=exact',
                                       '--config.hypergrad.meta_lr=128'),
      'semimeta_exact_beta4x': _preset('semimeta', '--config.hypergrad.mode=exact',
                                       '--config.hypergrad.meta_lr=256'),
      # The converged limit of a damped system: (G + 0.1 I)^-1 J v is the implicit hypergradient of
      # the proximal inner problem (lambda = 2 * 0.1 / B_u), within cosine 0.998 after 40 CG steps
      # (experiments/implicit_spectrum.py); 20 CG steps at damping 1e-4 are far from their limit.
      'semimeta_implicit_damped': _preset('semimeta', '--config.hypergrad.mode=implicit',
                                          '--config.hypergrad.cg_iterations=40',
                                          '--config.hypergrad.cg_damping=0.1',
                                          # All 40 in one loop iteration: a while loop's body runs
                                          # several times slower on XLA:CPU.
                                          '--config.hypergrad.loop_unroll=40',
                                          '--config.hypergrad.meta_step_scale=first_step_norm'),
      # bfloat16 activations (the GPU/TPU precision question), official mode.
      'semimeta_bf16': _preset('semimeta', '--config.half_precision=True'),
      'semimeta_jvp_bf16': _preset('semimeta', '--config.half_precision=True', '--config.hypergrad.mode=jvp'),
  }

# configs/digits.py's variants (the digits table's, and what other scripts import).
VARIANTS = variants('digits')
# The run of each hypergradient mode (finite_difference is the default 'semimeta').
MODE_VARIANTS = {'exact': 'semimeta_exact', 'first_order': 'semimeta_first_order',
                 'jvp': 'semimeta_jvp', 'finite_difference': 'semimeta'}
def _field_overrides(flags_list):
  """{'a.b': 'value'} of `--config.a.b=value` flags."""
  fields = {}
  for flag in flags_list:
    if not flag.startswith('--config.') or '=' not in flag:
      raise ValueError(f'{flag!r} is not of the form --config.FIELD=VALUE')
    name, value = flag[len('--config.'):].split('=', 1)
    fields[name] = value
  return fields


def check_overrides(variant, extra, dataset='digits'):
  """Refuses an --override that contradicts a field the variant sets itself."""
  own = _field_overrides(variants(dataset)[variant])
  for name, value in _field_overrides(extra).items():
    if name in own and own[name] != value:
      raise ValueError(f'--override=--config.{name}={value} contradicts variant {variant!r}, which '
                       f'sets --config.{name}={own[name]}; drop the variant or the override.')


def config_file(dataset='digits') -> str:
  """The config file of `dataset`'s runs, relative to the repository: configs/<dataset>.py."""
  return f'configs/{dataset}.py'


def resolve_config(flags_list, dataset='digits'):
  """The config `main` would run: configs/<dataset>.py with `flags_list` applied (ml_collections' parser)."""
  values = flags.FlagValues()
  argv = [f'{dataset}_results', f'--config={REPO / config_file(dataset)}', *flags_list]
  # The overrides are found in `sys_argv` when the flag is defined, as in `main`'s sys.argv.
  config_flags.DEFINE_config_file('config', None, flag_values=values, sys_argv=argv)
  values(argv)
  return json.loads(values.config.to_json_best_effort())


# Config fields renamed since runs were recorded: old dotted name -> new dotted name.
RENAMED_FIELDS = run_dir.RENAMED_FIELDS


def _flatten(tree, prefix=''):
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[prefix + key] = value
  return flat


@functools.cache
def _default_fields(dataset):
  """configs/<dataset>.py's fields without overrides, flattened (cached: the parser is slow)."""
  return json.dumps(_flatten(resolve_config([], dataset)))


def _differences(saved, wanted, dataset='digits'):
  """'field: ran X, requested Y' for each field that changes what a run computes.

  A run recorded by an earlier version is read in today's fields: a renamed field under its
  new name, and a field added since at its default (every field is added with a default that
  keeps the earlier behaviour), so such a run is reused unless it is asked to differ.
  """
  defaults = json.loads(_default_fields(dataset))
  saved = {RENAMED_FIELDS.get(name, name): value for name, value in _flatten(saved).items()}
  wanted = _flatten(wanted)
  saved.update({name: defaults[name] for name in wanted.keys() - saved.keys() if name in defaults})
  diffs = []
  for name in sorted(saved.keys() | wanted.keys()):
    a, b = saved.get(name, '<missing>'), wanted.get(name, '<missing>')
    if name not in run_dir.FREE_FIELDS and a != b:  # Free: log cadence, data location, remat.
      diffs.append(f'{name}: ran {a!r}, requested {b!r}')
  return diffs


def with_protocol(summary, workdir, config):
  """`summary` with the result protocol's figures, computed from the run's metrics.jsonl when a
  summary written before they existed lacks them (its other keys, old ones included, are kept).

  Args:
    summary: a run's summary.json.
    workdir: the run's directory.
    config: the run's config as a dict in today's fields (its method names the reported weights).
  """
  if 'median_last_20_error_top1' in summary:
    return summary
  headline = summary.get('reported_prefix') or methods.configure(
      ml_collections.ConfigDict(config)).headline
  return {**summary, **result_protocol.summarize(metrics_lib.read_rows(str(workdir)), headline),
          'reported_prefix': headline}


def trained_vae(workdir, overrides, dataset='digits'):
  """The `tnar.vae_dir` flag of a TNAR-VAE run, after training (or reusing) its seed's VAE.

  TNAR-VAE loads a VAE trained first by `semimeta_jax.vae_main` on the same data and
  seed; a variant that names no `tnar.vae_dir` gets one beside its run
  (`<variant>/seed_<k>_vae`). Other variants get no flag.
  """
  fields = _field_overrides(overrides)
  if fields.get('method') != 'tnar_vae' or 'tnar.vae_dir' in fields:
    return []
  vae_dir = (workdir.parent / f'{workdir.name}_vae').resolve()
  if not (vae_dir / 'vae.json').exists():
    vae_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, '-m', 'semimeta_jax.vae_main', f'--config={config_file(dataset)}',
               f'--workdir={vae_dir}', *overrides]
    with open(vae_dir / 'log.txt', 'a') as log:
      result = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode:
      raise RuntimeError(f'the VAE of {workdir} failed; see {vae_dir / "log.txt"}')
  return [f'--config.tnar.vae_dir={vae_dir}']


def run_one(variant, seed, out, data_dir, extra, dataset='digits'):
  """Runs (or reuses) one training run of configs/<dataset>.py; its summary (with the protocol's figures)."""
  workdir = out / variant / f'seed_{seed}'
  summary_path = workdir / 'summary.json'
  overrides = [f'--config.seed={seed}', *variants(dataset)[variant], *extra]
  if data_dir:
    overrides.append(f'--config.data.data_dir={data_dir}')
  overrides += trained_vae(workdir, overrides, dataset)
  wanted = resolve_config(overrides, dataset)
  if summary_path.exists():
    summary = json.loads(summary_path.read_text())
    diffs = _differences(summary['config'], wanted, dataset)
    if diffs:
      raise RuntimeError(f'{workdir} holds a run of another config ({"; ".join(diffs)}); use another '
                         '--out, or delete that directory to run it again.')
    if summary.get('completed'):
      return with_protocol(summary, workdir, wanted)
  command = [sys.executable, '-m', 'semimeta_jax.main', f'--config={config_file(dataset)}',
             f'--workdir={workdir}', *overrides]
  started = time.time()
  workdir.mkdir(parents=True, exist_ok=True)
  with open(workdir / 'log.txt', 'a') as log:
    result = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  if result.returncode:
    raise RuntimeError(f'{variant} seed {seed} failed; see {workdir / "log.txt"}')
  summary = json.loads(summary_path.read_text())
  print(f'{variant} seed {seed}: {summary["final_error_top1"]:.2f}% in {time.time() - started:.0f} s',
        flush=True)
  return with_protocol(summary, workdir, wanted)


def summary_row(variant, seed, summary):
  """The CSV row (and table input) of one run."""
  return {'variant': variant, 'seed': seed, 'final_error_top1': summary['final_error_top1'],
          'median_last_20_error_top1': summary.get('median_last_20_error_top1'),
          'median_last_20_count': summary.get('median_last_20_count'),
          'test_error_top1_at_best_validation': summary.get('test_error_top1_at_best_validation'),
          'best_validation_step': summary.get('best_validation_step'),
          'num_validation_examples': summary.get('num_validation_examples', 0),
          'num_labeled': summary['num_labeled'],
          'wall_seconds': summary.get('wall_seconds_total', summary['wall_seconds_this_run'])}


def _mean_std(values):
  values = np.array([np.nan if v is None else v for v in values], np.float64)
  if np.isnan(values).any():
    return '-'
  return f'{values.mean():.2f} ± {values.std(ddof=0):.2f}'


def protocol_note(rows, validation_size=0):
  """The sentence above a table that says what its columns are."""
  counts = sorted({r.get('median_last_20_count') for r in rows} - {None})
  over = '20' if counts == [20] else '/'.join(map(str, counts)) or '20'
  note = (f'Protocol: test error % (mean ± std over seeds) of the final weights, and the median over '
          f'the last {over} evaluations (FixMatch; fewer when a run made fewer)')
  if validation_size:
    note += (f', and at the evaluation with the lowest error on {validation_size} training examples '
             'held out as a validation split')
  return note + '. No column selects on the test set.'


def table(rows, validation_size=0):
  """Markdown: one line per variant, mean +- std over seeds of the protocol's errors, and run time.

  Args:
    rows: `summary_row`s (rows missing a figure, e.g. from an earlier CSV, show '-').
    validation_size: the held-out examples of the runs; > 0 adds the best-on-validation column.
  """
  headers = ['method', 'seeds', 'test error % (final)', 'test error % (median of last 20)']
  keys = ['final_error_top1', 'median_last_20_error_top1']
  if validation_size:
    headers.append('test error % (at best validation)')
    keys.append('test_error_top1_at_best_validation')
  headers.append('s / run')
  lines = ['| ' + ' | '.join(headers) + ' |', '|' + '---|' * len(headers)]
  for variant in dict.fromkeys(row['variant'] for row in rows):
    mine = [r for r in rows if r['variant'] == variant]
    labels = sorted({r['num_labeled'] for r in mine if r.get('num_labeled') is not None})
    label = LABELS.get(variant, variant).format(labels='/'.join(map(str, labels)) or '?')
    seconds = [r.get('wall_seconds') for r in mine]
    cells = [label, str(len(mine)), *(_mean_std([r.get(k) for r in mine]) for k in keys),
             '-' if None in seconds else f'{np.mean(seconds):.0f}']
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv=None, *, dataset='digits', description=__doc__, defaults=None):
  """The command line of a results table over configs/<dataset>.py's variants.

  Args:
    argv: the arguments (default: the command line's).
    dataset: the config (`configs/<dataset>.py`) and presets the runs use.
    description: the --help text.
    defaults: argparse defaults that differ from the digits table's (e.g. `validation_size`).
  """
  known = variants(dataset)
  parser = argparse.ArgumentParser(description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', default=f'results/{dataset}', help='Directory for runs and tables.')
  parser.add_argument('--variants', default='labeled_only,semimeta,fully_supervised',
                      help=f'Comma-separated, from: {",".join(known)}.')
  parser.add_argument('--seeds', default='0,1,2,3,4')
  parser.add_argument('--data_dir', default=None, help='TFDS data_dir (default: TFDS default).')
  parser.add_argument('--override', action='append', default=[],
                      help='Extra --config.x=y flag for every run (repeatable).')
  parser.add_argument('--validation_size', type=int, default=0,
                      help='Training examples each run holds out as a validation split '
                           '(config.data.validation_size); adds the best-on-validation column.')
  parser.set_defaults(**(defaults or {}))
  args = parser.parse_args(argv)
  if args.validation_size < 0:
    parser.error(f'--validation_size={args.validation_size} must be >= 0')
  if any(o.startswith('--config.data.validation_size=') for o in args.override):
    parser.error('give the validation split as --validation_size=N, not as an --override')
  extra = list(args.override)
  extra.append(f'--config.data.validation_size={args.validation_size}')
  chosen = args.variants.split(',')
  unknown = [v for v in chosen if v not in known]
  if unknown:
    parser.error(f'unknown variants {unknown}; choose from {list(known)}')
  for variant in chosen:
    try:
      check_overrides(variant, args.override, dataset)
    except ValueError as e:
      parser.error(str(e))
  out = pathlib.Path(args.out).resolve()
  seeds = [int(s) for s in args.seeds.split(',')]

  rows = []
  for variant in chosen:
    for seed in seeds:
      try:
        summary = run_one(variant, seed, out, args.data_dir, extra, dataset)
      except RuntimeError as e:
        parser.exit(2, f'error: {e}\n')
      rows.append(summary_row(variant, seed, summary))
  markdown = table(rows, args.validation_size)
  note = protocol_note(rows, args.validation_size)
  print(f'{note}\n\n{markdown}')
  os.makedirs(out, exist_ok=True)
  tag = '_'.join(chosen) if len(chosen) <= 3 else f'{len(chosen)}_variants'
  (out / f'table_{tag}.md').write_text(
      f'Command: python -m experiments.{dataset}_results --variants={args.variants} --seeds={args.seeds}'
      + f' --validation_size={args.validation_size}'
      + ''.join(f' --override={o}' for o in args.override) + f'\n\n{note}\n\n{markdown}\n')
  with open(out / f'runs_{tag}.csv', 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


if __name__ == '__main__':
  main()
