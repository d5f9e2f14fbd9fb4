r"""Benchmarks the compiled training step: supervised, SemiMeta in each hypergradient mode, and
any method's preset (`--modes=finite_difference,mt_sntg,co_training`; CIFAR-10's, or another
dataset's with `--presets_of=imagenet`).

For every mode it compiles `jax.jit(train_step, donate_argnums=0)` ahead of time (timing
`.lower()` + `.compile()`), runs a few warm-up steps, then times N steps one by one and
reports the median, with the step's FLOPs (its convolutions and matrix products counted
densely from the jaxpr, `flop_count.py`: the same on every backend, where XLA's compiled cost
analysis omits cuDNN's convolutions on GPU), the achieved FLOP/s, MFU against the device's
peak where known, and two memory figures:
  compiled MiB     from `compiled.memory_analysis()`: temp + argument + output - alias
                   bytes (the donated state is aliased by the new state, so it counts once);
                   available on every backend.
  device peak MiB  `device.memory_stats()['peak_bytes_in_use']` after the timed steps
                   (GPU/TPU only; '-' on CPU). It is a process high-water mark that cannot
                   be reset, so every mode runs in its own subprocess.
Each subprocess also gets its own XLA_FLAGS (XLA reads them once, at start-up), so
`--xla_flags_variants` compares flag sets in one table.

Inputs are synthetic (normal images, uniform labels): the input pipeline is not timed,
and no TensorFlow is needed. Sizes:
  default   ConvLarge (width 128), 128 labeled + 128 unlabeled 32x32x3 images, 10 classes.
  --small   ConvLarge at width 32, 32 + 32 images of 32x32x3: the CIFAR network's layer
            structure at 1/16 of its FLOPs, a few minutes in all on two CPU cores.
Any size field can be overridden, e.g. the ImageNet-size step:

  python -m experiments.benchmark_step --model resnet18 --image_size 224 --batch_size 64
  python -m experiments.benchmark_step --small \
    --xla_flags_variants='default;no_ynn_conv'

A preset row (`methods.presets('cifar10')`, e.g. `ma_dnn`, `dual_student`) runs that method with its
papers' settings (`configs/<dataset>.py:NAME`: that file's schedule, the preset's fields) at the same size, warm-up and ramps set to their end as for SemiMeta;
`tnar_vae` is left out (its step needs a trained VAE of the benchmark's input shape).
SemiMeta runs the default config (mix-up, K = 1, evaluation-mode meta forward, where
theta~ = theta and `jvp` / `finite_difference` skip the virtual step); `--forward_mode
train` times the meta step with dropout and batch statistics on instead.

images/s counts the images a step reads: labeled + unlabeled for SemiMeta, labeled only
for the supervised step (which ignores the unlabeled batch). The table is printed and
written to `<out_dir>/benchmark_step_<tag>.md` and `.csv`.
"""

import argparse
import datetime
import functools
import importlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import default
from experiments import flop_count
from experiments import results_table
from semimeta_jax import methods
from semimeta_jax import models

MODES = ('supervised', 'exact', 'first_order', 'jvp', 'finite_difference')
# Methods whose step needs state from outside the run (a trained VAE) have no preset row.
_NEEDS_OUTSIDE_STATE = ('tnar_vae',)


def preset_modes(dataset: str = 'cifar10') -> tuple[str, ...]:
  """The presets of `dataset` a row can run (`--modes=NAME`), besides MODES."""
  return tuple(name for name in methods.presets(dataset)
               if name not in _NEEDS_OUTSIDE_STATE and name not in MODES)

SIZES = {
    'default': dict(model='convlarge', model_width=0, batch_size=128, image_size=32, channels=3,
                    num_classes=10, steps=20, warmup_steps=3),
    'small': dict(model='convlarge', model_width=32, batch_size=32, image_size=32, channels=3,
                  num_classes=10, steps=10, warmup_steps=2),
}
# Named XLA_FLAGS sets; `--xla_flags_variants` also takes raw flag strings.
XLA_FLAG_PRESETS = {
    'default': '',
    # Stops offloading single convolutions to YNNPACK; XLA:CPU's default kernels run them.
    'no_ynn_conv': '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution',
}
COLUMNS = (  # (header, row key, format)
    ('device', 'device_kind', '{}'), ('XLA_FLAGS', 'xla_flags', '`{}`'), ('model', 'model', '{}'),
    ('batch (l+u)', 'batch', '{}'), ('input', 'input', '{}'), ('method / mode', 'name', '{}'),
    ('remat', 'remat', '{}'),
    ('compile s', 'compile_s', '{:.2f}'), ('median step ms', 'median_step_ms', '{:.1f}'),
    ('steps/s', 'steps_per_s', '{:.2f}'), ('images/s', 'images_per_s', '{:.0f}'),
    ('GFLOP/step', 'gflop_per_step', '{:.4g}'), ('achieved GFLOP/s', 'achieved_gflop_per_s', '{:.1f}'),
    ('MFU %', 'mfu_percent', '{:.1f}'), ('XLA GFLOP (compiled)', 'xla_compiled_gflop', '{:.4g}'),
    ('compiled MiB', 'compiled_mib', '{:.1f}'), ('device peak MiB', 'device_peak_mib', '{:.1f}'),
)
CSV_FIELDS = (
    'device_kind', 'platform', 'xla_flags', 'model', 'model_width', 'batch', 'input', 'num_classes',
    'half_precision', 'remat', 'method', 'mode', 'name', 'images_per_step', 'steps', 'warmup_steps',
    'lower_s', 'compile_s', 'median_step_ms', 'min_step_ms', 'max_step_ms', 'steps_per_s',
    'images_per_s', 'flops', 'gflop_per_step', 'achieved_gflop_per_s', 'peak_tflops', 'mfu_percent',
    'xla_lowered_gflop', 'xla_compiled_gflop', 'compiled_mib',
    'device_peak_mib', 'error')


def make_config(mode: str, *, model: str, model_width: int, batch_size: int,
                half_precision: bool = False, forward_mode: str = 'eval', remat: str = 'none',
                presets_of: str = 'cifar10'):
  """The default config running `mode` at one size.

  `mode` is 'supervised', a hypergradient mode of SemiMeta, or a preset of dataset
  `presets_of` (`preset_modes(presets_of)`), which sets its method and the method's fields.
  `forward_mode` is the meta step's forward: 'eval' (official) makes theta~ = theta, so
  `jvp` and `finite_difference` skip the virtual step; 'train' makes every mode take it.
  `remat` is `config.remat`, what a training forward keeps for its backward pass.
  """
  if mode not in MODES + preset_modes(presets_of):
    raise ValueError(f'Unknown mode {mode!r}; expected one of {MODES + preset_modes(presets_of)}.')
  config = default.get_config()
  if mode in MODES:
    config.method = 'supervised' if mode == 'supervised' else 'semimeta'
    if mode != 'supervised':
      config.hypergrad.mode = mode
  else:
    # The dataset's own config file: its presets may set fields only that file defines
    # (the ImageNet rows' epoch counts).
    config = importlib.import_module(f'configs.{presets_of}').get_config(mode)
  config.hypergrad.forward_mode = forward_mode
  config.model = model
  config.model_width = model_width
  config.labeled_batch_size = batch_size
  config.unlabeled_batch_size = batch_size
  config.half_precision = half_precision
  config.remat = remat
  # Full step sizes from step 0, as after warm-up: at lr = 0 the meta step would
  # scale its hypergradient to nothing, which is not the step being benchmarked.
  config.warmup_steps = 0
  config.consistency_rampup_steps = 0
  return config


def synthetic_batch(key, batch_size: int, image_shape, num_classes: int):
  """Labeled + unlabeled batches of normal images and uniform labels, training-loop layout."""
  keys = jax.random.split(key, 4)
  part = lambda k_image, k_label, first: {
      'image': jax.random.normal(k_image, (batch_size, *image_shape)),
      'label': jax.random.randint(k_label, (batch_size,), 0, num_classes),
      'index': first + jnp.arange(batch_size, dtype=jnp.int32)}  # Train-split indices.
  return {'labeled': part(keys[0], keys[1], 0), 'unlabeled': part(keys[2], keys[3], batch_size)}


def compiled_flops(compiled) -> float:
  """XLA's FLOP count of a compiled computation (NaN if the backend gives none).

  jax 0.10 returns one dict; older versions returned a list with one dict per
  computation, so both are accepted.
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get('flops')
  return float(flops) if flops is not None and flops > 0 else float('nan')


def compiled_bytes(compiled) -> float:
  """Bytes the compiled step needs at once: temporaries, arguments and outputs, aliases once."""
  stats = compiled.memory_analysis()
  if stats is None:
    return float('nan')
  return float(stats.temp_size_in_bytes + stats.argument_size_in_bytes
               + stats.output_size_in_bytes - stats.alias_size_in_bytes)


def initial_state(config, model, image_shape, key):
  """The step-0 TrainState, built by one compiled initialiser (eager init compiles op by op)."""
  # Per-example buffers (Temporal Ensembling) over the synthetic batch's indices.
  init = functools.partial(methods.init_train_state, config, model, image_shape,
                           num_train=2 * config.labeled_batch_size, num_classes=model.num_classes)
  # XLA:CPU spends many seconds optimising the unrolled threefry of every parameter's
  # initialiser; this runs once and is not timed, so it is compiled without optimisation.
  options = {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None
  return jax.jit(init).lower(key).compile(options)(key)


def measure_step(config, *, num_classes: int, image_shape, steps: int, warmup_steps: int,
                 seed: int = 0, name: str | None = None) -> dict:
  """Compiles and times one training step on the default device.

  Args:
    config: a run configuration (see `make_config`).
    num_classes: number of classes of the synthetic labels and the model head.
    image_shape: (H, W, C) of one image.
    steps: number of timed steps (the median is reported).
    warmup_steps: untimed steps run after compiling.
    seed: seed of the parameters and the synthetic batch.
    name: the row's name (default: the method, with SemiMeta's hypergradient mode).

  Returns:
    One table row: a dict with the keys of CSV_FIELDS (except 'error').
  """
  init_key, batch_key = jax.random.split(jax.random.key(seed))
  model = models.get_model(config, num_classes)
  state = initial_state(config, model, tuple(image_shape), init_key)
  batch_size = config.labeled_batch_size
  batch = synthetic_batch(batch_key, batch_size, tuple(image_shape), num_classes)
  step = jax.jit(methods.make_train_step(config, num_classes), donate_argnums=0)

  start = time.perf_counter()
  lowered = step.lower(state, batch)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compiled_at = time.perf_counter()
  # Traced only (nothing runs), so before the first call donates `state`.
  flops = flop_count.count_flops(step, state, batch)

  # Every step is awaited, so each time is one step's latency, dispatch included.
  times = []
  for i in range(warmup_steps + steps):
    tick = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    if i >= warmup_steps:
      times.append(time.perf_counter() - tick)

  device = jax.devices()[0]
  memory = device.memory_stats() or {}
  peak = memory.get('peak_bytes_in_use')
  median = float(np.median(times))
  peak_flops = flop_count.peak_flops(device.device_kind, config.half_precision)
  uses_unlabeled = methods.get(config.method).uses_unlabeled
  images = batch_size * (2 if uses_unlabeled else 1)
  height, width, channels = image_shape
  return {
      'device_kind': device.device_kind,
      'platform': device.platform,
      'xla_flags': os.environ.get('XLA_FLAGS', '').strip(),
      'model': config.model + (f' (width {config.model_width})' if config.model_width else ''),
      'model_width': config.model_width,
      'batch': f'{batch_size}+{batch_size if uses_unlabeled else 0}',
      'input': f'{height}x{width}x{channels}',
      'num_classes': num_classes,
      'half_precision': bool(config.half_precision),
      'remat': config.remat,
      'method': config.method,
      'mode': config.hypergrad.mode if config.method == 'semimeta' else '',
      'name': name or (f'semimeta / {config.hypergrad.mode}' if config.method == 'semimeta'
                       else config.method),
      'images_per_step': images,
      'steps': steps,
      'warmup_steps': warmup_steps,
      'lower_s': lowered_at - start,
      'compile_s': compiled_at - start,
      'median_step_ms': 1e3 * median,
      'min_step_ms': 1e3 * min(times),
      'max_step_ms': 1e3 * max(times),
      'steps_per_s': 1.0 / median,
      'images_per_s': images / median,
      'flops': flops,
      'gflop_per_step': flops / 1e9,
      'achieved_gflop_per_s': flops / 1e9 / median,
      'peak_tflops': peak_flops / 1e12,
      'mfu_percent': 100.0 * flops / median / peak_flops,
      'xla_lowered_gflop': flop_count.lowered_xla_flops(lowered) / 1e9,
      'xla_compiled_gflop': compiled_flops(compiled) / 1e9,
      'compiled_mib': compiled_bytes(compiled) / 2**20,
      'device_peak_mib': float('nan') if peak is None else peak / 2**20,
  }


def render_markdown(rows) -> str:
  """The rows as a markdown table (failed rows keep their identity and show the error)."""
  return results_table.render_markdown(rows, COLUMNS, empty_as={'xla_flags': '(none)'})


def write_results(rows, out_dir: str, tag: str, notes=()) -> tuple[str, str]:
  """Writes `benchmark_step_<tag>.md` (notes, then the table) and `.csv`; returns both paths."""
  md_path = os.path.join(out_dir, f'benchmark_step_{tag}.md')
  csv_path = os.path.join(out_dir, f'benchmark_step_{tag}.csv')
  results_table.write_markdown_and_csv(md_path, csv_path, render_markdown(rows), rows, CSV_FIELDS, notes)
  return md_path, csv_path


def resolve_flag_variants(spec: str) -> list[str]:
  """';'-separated XLA_FLAGS sets, each a preset name (XLA_FLAG_PRESETS) or a raw flag string."""
  return [XLA_FLAG_PRESETS.get(item.strip(), item.strip()) for item in spec.split(';')]


def _size_args(args) -> list[str]:
  """The resolved size flags, passed on verbatim to each subprocess."""
  names = ('model', 'model_width', 'batch_size', 'image_size', 'channels', 'num_classes', 'steps',
           'warmup_steps', 'seed', 'forward_mode', 'remat', 'presets_of')
  flags = [f'--{name}={getattr(args, name)}' for name in names]
  return flags + (['--half_precision'] if args.half_precision else [])


def _run_in_subprocess(args, mode: str, flags: str, remat: str, rows_dir: str) -> dict:
  """Measures one mode in a fresh process under XLA_FLAGS = inherited flags + `flags`."""
  args = argparse.Namespace(**{**vars(args), 'remat': remat})
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {flags}'.strip()
  rows_out = os.path.join(rows_dir, f'{len(os.listdir(rows_dir))}.json')
  command = [sys.executable, '-m', 'experiments.benchmark_step', '--single_variant',
             f'--modes={mode}', f'--rows_out={rows_out}', *_size_args(args)]
  result = subprocess.run(command, env=env, check=False)
  if result.returncode != 0:
    return {'xla_flags': env['XLA_FLAGS'], 'model': args.model, 'name': mode, 'remat': remat,
            'error': f'exit status {result.returncode}'}
  with open(rows_out) as f:
    return json.load(f)[0]


def _parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--small', action='store_true', help='CPU-sized defaults (SIZES["small"]).')
  parser.add_argument('--modes', default=','.join(MODES),
                      help=f'Comma-separated, from {MODES} and the presets of --presets_of '
                      f'(CIFAR-10: {preset_modes()}).')
  parser.add_argument('--presets_of', default='cifar10',
                      help="The dataset whose presets --modes names (e.g. 'imagenet').")
  for name, kind in (('model', str), ('model_width', int), ('batch_size', int), ('image_size', int),
                     ('channels', int), ('num_classes', int), ('steps', int), ('warmup_steps', int)):
    parser.add_argument(f'--{name}', type=kind, default=None, help='Overrides the size preset.')
  parser.add_argument('--half_precision', action='store_true', help='bfloat16 activations.')
  parser.add_argument('--forward_mode', default='eval', choices=('eval', 'train'),
                      help="The meta step's forward (config.hypergrad.forward_mode).")
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--remat', default='none',
                      help='Comma-separated config.remat policies, one row each: none,batch_norm.')
  parser.add_argument('--xla_flags_variants', default='default',
                      help=f"';'-separated XLA_FLAGS sets; presets: {sorted(XLA_FLAG_PRESETS)}.")
  parser.add_argument('--out_dir', default='results')
  parser.add_argument('--tag', default=None, help='File name tag; default from model and size.')
  parser.add_argument('--single_variant', action='store_true',
                      help='Measure in this process under the current XLA_FLAGS (used internally).')
  parser.add_argument('--rows_out', default=None, help='With --single_variant: JSON file for the rows.')
  args = parser.parse_args(argv)
  preset = SIZES['small' if args.small else 'default']
  for name, value in preset.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  args.modes = [mode.strip() for mode in args.modes.split(',') if mode.strip()]
  if not args.single_variant:
    args.remat_variants = [name.strip() for name in args.remat.split(',') if name.strip()]
    unknown_remat = sorted(set(args.remat_variants) - set(models.REMAT_POLICIES))
    if unknown_remat:
      parser.error(f'unknown remat policies {unknown_remat}; expected a subset of {models.REMAT_POLICIES}')
  known = MODES + preset_modes(args.presets_of)
  unknown = sorted(set(args.modes) - set(known))
  if unknown:
    parser.error(f'unknown modes {unknown}; expected a subset of {known}')
  return args


def main(argv=None):
  args = _parse_args(argv)
  image_shape = (args.image_size, args.image_size, args.channels)
  if args.single_variant:
    rows = []
    for mode in args.modes:
      config = make_config(mode, model=args.model, model_width=args.model_width,
                           batch_size=args.batch_size, half_precision=args.half_precision,
                           forward_mode=args.forward_mode, remat=args.remat,
                           presets_of=args.presets_of)
      row = measure_step(config, num_classes=args.num_classes, image_shape=image_shape,
                         steps=args.steps, warmup_steps=args.warmup_steps, seed=args.seed,
                         name=None if mode in MODES else f'{mode} ({args.presets_of} preset)')
      print(f'[{row["xla_flags"] or "(no XLA_FLAGS)"}] {row["name"]} remat={row["remat"]}: compile {row["compile_s"]:.1f} s, '
            f'median step {row["median_step_ms"]:.1f} ms', file=sys.stderr, flush=True)
      rows.append(row)
    if args.rows_out:
      with open(args.rows_out, 'w') as f:
        json.dump(rows, f)
    return rows

  with tempfile.TemporaryDirectory() as rows_dir:
    rows = [_run_in_subprocess(args, mode, flags, policy, rows_dir)
            for flags in resolve_flag_variants(args.xla_flags_variants)
            for policy in args.remat_variants for mode in args.modes]
  platform = next((row['platform'] for row in rows if 'platform' in row), 'unknown')
  width = f'_w{args.model_width}' if args.model_width else ''
  half = '_bf16' if args.half_precision else ''
  meta = '_train_meta' if args.forward_mode == 'train' else ''
  tag = args.tag or f'{args.model}{width}_{args.image_size}px_b{args.batch_size}{half}{meta}_{platform}'
  command = ['-m', 'experiments.benchmark_step'] + (sys.argv[1:] if argv is None else list(argv))
  notes = [
      f'Command: `python {" ".join(shlex.quote(a) for a in command)}`',
      f'Date: {datetime.datetime.now().isoformat(timespec="seconds")}; jax {jax.__version__}; '
      f'host CPUs: {os.cpu_count()}; {args.num_classes} classes; synthetic inputs.',
      f'SemiMeta: default config (mix-up, K = 1), {args.forward_mode}-mode meta forward'
      + (' (theta~ = theta: jvp and finite_difference skip the virtual step).'
         if args.forward_mode == 'eval' else '.'),
      f'Median of {args.steps} timed steps after {args.warmup_steps} warm-up steps, each step awaited; '
      'compile s = lower + XLA compile. GFLOP/step: the convolutions and matrix products of the '
      "step's jaxpr, counted densely (experiments/flop_count.py; the same on every backend); MFU "
      'against the dense peak of the device at the precision (bf16, or TF32 for float32) where known. '
      'XLA GFLOP (compiled): its cost analysis of the compiled step, which on GPU omits cuDNN '
      'convolutions.',
      'compiled MiB = temp + argument + output - aliased bytes (memory_analysis); device peak MiB = '
      "memory_stats()['peak_bytes_in_use'] of the subprocess that ran the row (GPU/TPU only).",
      'images/s counts the images a step reads (the supervised step ignores the unlabeled batch).',
  ]
  md_path, csv_path = write_results(rows, args.out_dir, tag, notes)
  print('\n'.join(notes) + '\n\n' + render_markdown(rows))
  print(f'Wrote {md_path} and {csv_path}.')
  return rows


if __name__ == '__main__':
  main()
