r"""Where the training step's device memory goes, and what rematerialisation saves.

Two measurements, both from compiling only (nothing is run, so the default ConvLarge
128 + 128 size takes a few minutes on two CPU cores):

  1. What one training-mode forward keeps for its backward pass, by the primitive that
     produced it (`saved_residuals` of the jaxpr: the same on every backend, before XLA
     fuses or rematerialises anything), for each `config.remat` policy.
  2. The compiled step's memory (`memory_analysis`: arguments, outputs, temporaries; the
     donated state counts once) for each step x precision x policy, on this backend.

SemiMeta's update differentiates two training forwards at once (the mixed labeled batch and
the unlabeled batch), so its peak holds two sets of (1); the supervised step holds one.

  python -m experiments.memory_breakdown --out=results            # ConvLarge 128 + 128
  python -m experiments.memory_breakdown --small --out=results    # width 32, 32 + 32

Runs without TensorFlow. Writes `memory_breakdown_<tag>.md` and `.csv` into `--out`.
"""

import argparse
import collections
import datetime
import sys

import jax
from jax._src import ad_checkpoint
import jax.numpy as jnp
import numpy as np

from experiments import benchmark_step
from experiments import results_table
from semimeta_jax import methods
from semimeta_jax import models
from semimeta_jax.methods import common

MIB = 2**20
COLUMNS = (  # (header, row key, format)
    ('device', 'device_kind', '{}'), ('step', 'name', '{}'), ('precision', 'precision', '{}'),
    ('remat', 'remat', '{}'), ('one forward keeps MiB', 'residual_mib', '{:.1f}'),
    ('arguments MiB', 'argument_mib', '{:.1f}'), ('temporaries MiB', 'temp_mib', '{:.1f}'),
    ('compiled MiB', 'compiled_mib', '{:.1f}'), ('compile s', 'compile_s', '{:.1f}'),
)
CSV_FIELDS = ('device_kind', 'platform', 'model', 'batch', 'name', 'precision', 'remat',
              'residual_mib', 'residual_by_kind', 'argument_mib', 'output_mib', 'alias_mib',
              'temp_mib', 'compiled_mib', 'compile_s')


def residuals_by_kind(state, image_shape, batch_size: int) -> dict:
  """MiB that one training forward of `batch_size` images keeps for its backward, by producer.

  Parameters are left out: they are live anyway. The keys are the primitive (or jitted
  function) whose output is kept, e.g. 'sub' (batch norm's centred input) or
  'conv_general_dilated'.
  """
  images = jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.float32)

  def forward_loss(params, x):
    logits, _ = common.train_forward(state, params, x, state.batch_stats, jax.random.key(0))
    return jnp.sum(logits.astype(jnp.float32))

  kinds = collections.Counter()
  for aval, source in ad_checkpoint.saved_residuals(forward_loss, state.params, images):
    if 'from the argument params' in source:
      continue
    # 'output of jitted function 'leaky_relu' from .../layers.py:12 (...)' -> 'leaky_relu'.
    kind = source.split(' from ')[0].replace('output of ', '').replace('jitted function ', '')
    kinds[kind.strip("'")] += int(np.prod(aval.shape)) * aval.dtype.itemsize
  return {kind: size / MIB for kind, size in kinds.most_common()}


def measure(mode: str, *, half_precision: bool, policy: str, size: dict) -> dict:
  """One row: residuals of one forward and the compiled step's memory for one configuration."""
  config = benchmark_step.make_config(
      mode, model=size['model'], model_width=size['model_width'], batch_size=size['batch_size'],
      half_precision=half_precision, remat=policy)
  image_shape = (size['image_size'], size['image_size'], size['channels'])
  num_classes = size['num_classes']
  model = models.get_model(config, num_classes)
  state = benchmark_step.initial_state(config, model, image_shape, jax.random.key(0))
  batch = benchmark_step.synthetic_batch(jax.random.key(1), size['batch_size'], image_shape, num_classes)
  kinds = residuals_by_kind(state, image_shape, size['batch_size'])
  step = jax.jit(methods.make_train_step(config, num_classes), donate_argnums=0)
  start = datetime.datetime.now()
  stats = step.lower(state, batch).compile().memory_analysis()
  compile_s = (datetime.datetime.now() - start).total_seconds()
  uses_unlabeled = methods.get(config.method).uses_unlabeled
  row = {
      'device_kind': jax.devices()[0].device_kind, 'platform': jax.default_backend(),
      'model': config.model + (f' (width {config.model_width})' if config.model_width else ''),
      'batch': f'{size["batch_size"]}+{size["batch_size"] if uses_unlabeled else 0}',
      'name': f'semimeta / {mode}' if uses_unlabeled else 'supervised',
      'precision': 'bf16' if half_precision else 'fp32', 'remat': policy,
      'residual_mib': sum(kinds.values()),
      'residual_by_kind': '; '.join(f'{kind} {mib:.1f}' for kind, mib in kinds.items() if mib >= 0.1),
      'compile_s': compile_s,
  }
  if stats is not None:
    row.update(argument_mib=stats.argument_size_in_bytes / MIB, output_mib=stats.output_size_in_bytes / MIB,
               alias_mib=stats.alias_size_in_bytes / MIB, temp_mib=stats.temp_size_in_bytes / MIB,
               compiled_mib=(stats.temp_size_in_bytes + stats.argument_size_in_bytes
                             + stats.output_size_in_bytes - stats.alias_size_in_bytes) / MIB)
  return row


def _parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--small', action='store_true', help='ConvLarge width 32, 32 + 32 images.')
  parser.add_argument('--modes', default='supervised,finite_difference',
                      help=f'Comma-separated subset of {benchmark_step.MODES}.')
  parser.add_argument('--precisions', default='fp32,bf16', help='fp32, bf16 or both.')
  parser.add_argument('--remat', default=','.join(models.REMAT_POLICIES), help='config.remat policies.')
  parser.add_argument('--out', default='results')
  args = parser.parse_args(argv)
  args.modes = [m for m in args.modes.split(',') if m]
  args.precisions = [p for p in args.precisions.split(',') if p]
  args.remat = [p for p in args.remat.split(',') if p]
  for name, values, allowed in (('modes', args.modes, benchmark_step.MODES),
                                ('precisions', args.precisions, ('fp32', 'bf16')),
                                ('remat', args.remat, models.REMAT_POLICIES)):
    unknown = sorted(set(values) - set(allowed))
    if unknown:
      parser.error(f'--{name}: unknown {unknown}; expected a subset of {allowed}')
  return args


def main(argv=None):
  args = _parse_args(argv)
  size = benchmark_step.SIZES['small' if args.small else 'default']
  rows = []
  for mode in args.modes:
    for precision in args.precisions:
      for policy in args.remat:
        row = measure(mode, half_precision=precision == 'bf16', policy=policy, size=size)
        print(f'{row["name"]} {precision} remat={policy}: forward keeps {row["residual_mib"]:.1f} MiB '
              f'({row["residual_by_kind"]}); compiled {row.get("compiled_mib", float("nan")):.1f} MiB',
              flush=True)
        rows.append(row)
  tag = f'{"small" if args.small else "convlarge_b128"}_{jax.default_backend()}'
  notes = [
      f'Command: `python -m experiments.memory_breakdown {" ".join(sys.argv[1:] if argv is None else argv)}`',
      f'Date: {datetime.datetime.now().isoformat(timespec="seconds")}; jax {jax.__version__}; compiled only.',
      '"one forward keeps": the activations one training-mode forward of one batch saves for its '
      'backward (jaxpr residuals, parameters excluded; backend-independent). compiled MiB = '
      'temporaries + arguments + outputs - aliased (memory_analysis of the donated step).',
  ]
  results_table.publish(args.out, f'memory_breakdown_{tag}', rows, COLUMNS, CSV_FIELDS, notes)
  return rows


if __name__ == '__main__':
  main()
