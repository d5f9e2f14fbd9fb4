r"""Where one compiled training step's time goes: convolutions, batch-norm reductions, the rest.

Compiles the step of `benchmark_step` (same configs and sizes), traces a few steps with
`jax.profiler` and attributes every traced XLA operation to a category from the compiled
HLO: each event is matched to the HLO instruction it ran (its name, or the `hlo_op` the GPU
tracer attaches to a kernel) and the instruction to a category by what it computes:

  convolution     convolutions (cuDNN custom calls on GPU) and fusions around one
  matmul          dots and GEMM custom calls
  reduction       fusions with a reduce: batch-norm statistics and their gradients, losses
  layout          copies and transposes (layout changes) on their own
  elementwise     the other fusions: batch norm's normalisation, activations, the optimizer
  collective      all-reduces and other cross-device communication
  other           every other instruction

A device kernel that matches no instruction (one replayed inside a CUDA graph may carry no
`hlo_op`) is classified by its kernel name instead (KERNEL_NAME_PATTERNS; the CSV says how many
ms per step came from names). Other time that matches no instruction (the runtime's and the
profiler's own events, which also enclose the operations) is left out; the CSV keeps its total
and largest names, and the table the operations' time next to the traced wall time per step, so
a trace this script cannot read shows as missing time rather than as a wrong split.

  python -m experiments.profile_step --half_precision --out=results         # ConvLarge 128+128
  python -m experiments.profile_step --small --out=results                  # 2 CPU cores
  python -m experiments.profile_step --batch_size=512 --half_precision --modes=supervised,finite_difference

Runs without TensorFlow. Prints a table per mode and writes `profile_step_<tag>.md` / `.csv`.
"""

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import re
import sys
import tempfile

import jax

from experiments import benchmark_step
from experiments import results_table
from semimeta_jax import methods
from semimeta_jax import models

CATEGORIES = ('convolution', 'matmul', 'reduction', 'layout', 'elementwise', 'collective', 'other')
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
# `%name = type opcode(...)`: one HLO instruction (the type may be a tuple with spaces).
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\(')
_COMPUTATION = re.compile(r'^\s*%?([\w.\-]+)\s*(?:\([^)]*\))?.*\{\s*$')


def _normal(name: str) -> str:
  """Instruction names as kernels spell them: XLA replaces '.' and '-' by '_' in kernel names."""
  return name.replace('.', '_').replace('-', '_')


def instruction_categories(hlo_text: str) -> dict[str, str]:
  """{normalised instruction name: category} for every instruction of a compiled HLO module."""
  computations, current = {}, None
  instructions = []  # (computation, name, opcode, line)
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if match and current is not None:
      instructions.append((current, match.group(1), match.group(2), line))
      computations[current].append((match.group(2), line))
      continue
    header = _COMPUTATION.match(line)
    if header and '=' not in line.split('{')[0]:
      current = header.group(1)
      computations[current] = []

  def kinds_inside(line: str) -> set[str]:
    called = re.findall(r'calls=%?([\w.\-]+)', line)
    return {opcode for name in called for opcode, _ in computations.get(name, ())}

  categories = {}
  for _, name, opcode, line in instructions:
    inside = kinds_inside(line) if opcode == 'fusion' else set()
    target = re.search(r'custom_call_target="([^"]+)"', line)
    target = target.group(1).lower() if target else ''
    if opcode == 'convolution' or 'convolution' in inside or 'conv' in target:
      category = 'convolution'
    elif opcode == 'dot' or 'dot' in inside or 'gemm' in target or 'matmul' in target:
      category = 'matmul'
    elif opcode in COLLECTIVES or any(op.startswith(COLLECTIVES) for op in inside) or opcode.startswith(
        tuple(c + '-start' for c in COLLECTIVES)):
      category = 'collective'
    elif opcode == 'reduce' or 'reduce' in inside or 'reduce-window' in inside:
      category = 'reduction'
    elif opcode in ('copy', 'transpose') or (inside and inside <= {'parameter', 'copy', 'transpose',
                                                                    'bitcast', 'reshape'}):
      category = 'layout'
    elif opcode == 'fusion':
      category = 'elementwise'
    else:
      category = 'other'
    categories[_normal(name)] = category
  return categories


def _trace_events(trace_dir: str) -> list[dict]:
  paths = glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'), recursive=True)
  if not paths:
    raise FileNotFoundError(f'jax.profiler wrote no perfetto trace under {trace_dir}')
  with gzip.open(sorted(paths)[-1]) as f:
    data = json.load(f)
  return data['traceEvents'] if isinstance(data, dict) else data


# Device kernels that no HLO instruction claims (a kernel replayed inside a CUDA graph may carry
# no `hlo_op`) are classified by their name, first pattern first: cuDNN's convolution kernels
# are "implicit GEMMs", so convolution comes before matmul.
KERNEL_NAME_PATTERNS = (
    ('convolution', ('conv', 'fprop', 'dgrad', 'wgrad', 'cudnn')),
    ('matmul', ('gemm', 'cutlass', 'cublas')),
    ('reduction', ('reduce', 'reduction')),
    ('layout', ('copy', 'transpose')),
    ('elementwise', ('fusion',)),
)


def _category_by_kernel_name(name: str):
  name = name.lower()
  return next((category for category, patterns in KERNEL_NAME_PATTERNS
               if any(pattern in name for pattern in patterns)), None)


def attribute(events: list[dict], categories: dict[str, str]) -> tuple[dict, float, float, dict]:
  """Sums complete events per category.

  Returns:
    ({category: seconds}, seconds of those classified by kernel name, unmatched seconds,
    {unmatched name: seconds}). On a GPU only the device's kernels count (the host's launch
    events carry the same names), and only they fall back to their kernel name.
  """
  threads = {(e.get('pid'), e.get('tid')): e.get('args', {}).get('name', '')
             for e in events if e.get('ph') == 'M' and e.get('name') == 'thread_name'}
  processes = {e.get('pid'): e.get('args', {}).get('name', '')
               for e in events if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  on_device = lambda e: ('/device:' in processes.get(e.get('pid'), '')
                         or 'stream' in threads.get((e.get('pid'), e.get('tid')), '').lower())
  complete = [e for e in events if e.get('ph') == 'X' and not e['name'].startswith('end: ')]
  device = any(on_device(e) for e in complete)
  if device:
    complete = [e for e in complete if on_device(e)]
  totals, unmatched, by_name = collections.Counter(), collections.Counter(), 0.0
  for event in complete:
    args = event.get('args') or {}
    keys = [args.get('hlo_op', ''), event['name'], event['name'].split(':')[0]]
    category = next((categories[_normal(k)] for k in keys if k and _normal(k) in categories), None)
    seconds = float(event.get('dur', 0)) * 1e-6
    if category is None and device:
      category = _category_by_kernel_name(event['name'])
      by_name += seconds if category else 0.0
    if category is None:
      unmatched[event['name'][:60]] += seconds
    else:
      totals[category] += seconds
  return dict(totals), by_name, sum(unmatched.values()), dict(unmatched.most_common(5))


def profile(config, *, num_classes: int, image_shape, steps: int, seed: int = 0) -> dict:
  """Traces `steps` steps of the compiled train step; returns the per-category split (one row)."""
  init_key, batch_key = jax.random.split(jax.random.key(seed))
  model = models.get_model(config, num_classes)
  state = benchmark_step.initial_state(config, model, tuple(image_shape), init_key)
  batch = benchmark_step.synthetic_batch(batch_key, config.labeled_batch_size, tuple(image_shape),
                                         num_classes)
  compiled = jax.jit(methods.make_train_step(config, num_classes), donate_argnums=0).lower(
      state, batch).compile()
  categories = instruction_categories(compiled.as_text())
  for _ in range(3):  # Warm-up: first-run allocations and autotuning stay out of the trace.
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  with tempfile.TemporaryDirectory() as trace_dir:
    start = datetime.datetime.now()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(steps):
        state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
    wall = (datetime.datetime.now() - start).total_seconds()
    totals, by_name, unmatched, top_unmatched = attribute(_trace_events(trace_dir), categories)
  attributed = sum(totals.values())
  uses_unlabeled = methods.get(config.method).uses_unlabeled
  row = {
      'device_kind': jax.devices()[0].device_kind,
      'name': f'semimeta / {config.hypergrad.mode}' if uses_unlabeled else 'supervised',
      'precision': 'bf16' if config.half_precision else 'fp32',
      'remat': config.remat,
      'batch': f'{config.labeled_batch_size}+{config.labeled_batch_size if uses_unlabeled else 0}',
      'steps': steps,
      'op_ms_per_step': 1e3 * attributed / steps,
      'traced_wall_ms_per_step': 1e3 * wall / steps,
      'by_kernel_name_ms_per_step': 1e3 * by_name / steps,
      'unmatched_ms_per_step': 1e3 * unmatched / steps,
      'top_unmatched': '; '.join(f'{k} {1e3 * v / steps:.2f} ms' for k, v in top_unmatched.items()),
  }
  for category in CATEGORIES:
    seconds = totals.get(category, 0.0)
    row[f'{category}_ms'] = 1e3 * seconds / steps
    row[f'{category}_percent'] = 100.0 * seconds / attributed if attributed else float('nan')
  return row


COLUMNS = (('device', 'device_kind', '{}'), ('step', 'name', '{}'), ('precision', 'precision', '{}'),
           ('remat', 'remat', '{}'), ('batch', 'batch', '{}'),
           ('ops ms/step', 'op_ms_per_step', '{:.2f}')) + tuple(
               (f'{c} %', f'{c}_percent', '{:.1f}') for c in CATEGORIES) + (
                   ('traced wall ms/step', 'traced_wall_ms_per_step', '{:.2f}'),)
CSV_FIELDS = (('device_kind', 'name', 'precision', 'remat', 'batch', 'steps', 'op_ms_per_step',
               'traced_wall_ms_per_step', 'by_kernel_name_ms_per_step', 'unmatched_ms_per_step',
               'top_unmatched')
              + tuple(f'{c}_ms' for c in CATEGORIES) + tuple(f'{c}_percent' for c in CATEGORIES))


def _parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--small', action='store_true', help='benchmark_step\'s CPU size.')
  parser.add_argument('--modes', default='supervised,finite_difference')
  parser.add_argument('--batch_size', type=int, default=None)
  parser.add_argument('--half_precision', action='store_true')
  parser.add_argument('--remat', default='none', choices=models.REMAT_POLICIES)
  parser.add_argument('--steps', type=int, default=5, help='Traced steps.')
  parser.add_argument('--out', default='results')
  args = parser.parse_args(argv)
  args.modes = [m for m in args.modes.split(',') if m]
  unknown = sorted(set(args.modes) - set(benchmark_step.MODES))
  if unknown:
    parser.error(f'unknown modes {unknown}; expected a subset of {benchmark_step.MODES}')
  return args


def main(argv=None):
  args = _parse_args(argv)
  size = dict(benchmark_step.SIZES['small' if args.small else 'default'])
  if args.batch_size:
    size['batch_size'] = args.batch_size
  image_shape = (size['image_size'], size['image_size'], size['channels'])
  rows = []
  for mode in args.modes:
    config = benchmark_step.make_config(mode, model=size['model'], model_width=size['model_width'],
                                        batch_size=size['batch_size'],
                                        half_precision=args.half_precision, remat=args.remat)
    row = profile(config, num_classes=size['num_classes'], image_shape=image_shape, steps=args.steps)
    print(f'{row["name"]}: ' + ', '.join(f'{c} {row[c + "_percent"]:.1f}%' for c in CATEGORIES)
          + f' of {row["op_ms_per_step"]:.2f} ms of ops per step', flush=True)
    rows.append(row)
  tag = (f'{"small" if args.small else size["model"]}_b{size["batch_size"]}'
         f'{"_bf16" if args.half_precision else ""}_{jax.default_backend()}')
  notes = [
      f'Command: `python -m experiments.profile_step {" ".join(sys.argv[1:] if argv is None else argv)}`',
      f'Date: {datetime.datetime.now().isoformat(timespec="seconds")}; jax {jax.__version__}; '
      f'{args.steps} traced steps after 3 warm-up steps; synthetic inputs.',
      'Percent of the time of the XLA operations the trace attributes to the compiled step '
      '(on GPU, its kernels); ops ms/step may exceed the wall time where operations run on '
      'several threads at once (CPU) and falls short of it where the device idles.',
  ]
  results_table.publish(args.out, f'profile_step_{tag}', rows, COLUMNS, CSV_FIELDS, notes)
  return rows


if __name__ == '__main__':
  main()
