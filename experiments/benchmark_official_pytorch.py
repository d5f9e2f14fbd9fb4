r"""The official SemiMeta training step in PyTorch, timed for comparison with `benchmark_step.py`.

Restates one training step of the official code (github.com/Sakura03/SemiMeta) with random
on-device inputs, so that its step time and memory can be set beside those of our JAX step:
  model.py                `ConvLarge(num_classes, stochastic=True, top_bn=False)`, restated
                          in official_pytorch/models.py with a `width` argument (128 is the
                          official network).
  train_meta.py           the SemiMeta step of CIFAR/SVHN, line for line: the labeled loss and
                          its gradient v in evaluation mode; ytil = softmax(f(x_u)) from an
                          evaluation-mode forward; eps = epsilon / ||v||; the two perturbed
                          forwards at theta +- eps v (in-place on the parameters, then restored);
                          d = (softmax(f+) - softmax(f-)) / eps; yhat = relu(ytil - lr d) divided
                          by its row sum (a zero row stays zero); then, in training mode, mix-up
                          (per-example lambda ~ Beta(a, a)) with the KL loss and the squared-L2
                          consistency term, two forwards, and one SGD step (momentum 0.9, no
                          Nesterov, coupled weight decay 1e-4).
  train_meta_imagenet.py  the same step on `torchvision.models.resnet18` (mix-up always on).
                          Its 8-GPU DistributedDataParallel and SyncBatchNorm are left out: on one
                          device SyncBatchNorm computes what BatchNorm2d does.
  train_baseline.py       the supervised step without `--mix-up`: cross-entropy on the labeled
                          batch in training mode, one SGD step. It is the 'supervised' row.

What a step here leaves out: the data loader (inputs are generated once, on the device) and the
per-step accuracy / loss meters of the official loop (their `.item()` calls are logging). What
it keeps: the official step's own host synchronisations. `p.data.add_(g, alpha=epsilon)` takes
a 0-dim device tensor as `alpha`, which PyTorch reads back to the host at every call: once per
parameter tensor in each of the three perturbation loops (87 times per step for ConvLarge's 29
tensors), and the mix-up coefficients are drawn on the CPU and copied with `.cuda()`. `--sync_free` adds rows of the same
step without them (epsilon kept on the device, multi-tensor `_foreach` updates, Beta sampled on
the device), i.e. what a PyTorch user could get from the same algorithm.

The learning rate and consistency weight are those after warm-up (lr 0.1, w 1), as in
`benchmark_step.py`: at lr = 0 the pseudo-label update would be a no-op. cuDNN settings follow
the official scripts unless overridden: `cudnn.benchmark = True` everywhere, and
`cudnn.deterministic = True` for ConvLarge (train_meta.py sets it; train_meta_imagenet.py does not).
TF32 stays at PyTorch's defaults (cuDNN convolutions may use it, matmuls do not); the notes above
the table record the setting.

Precisions: 'fp32', and 'bf16' = every forward and loss under
`torch.autocast(device_type, dtype=torch.bfloat16)` with float32 parameters, gradients and
optimizer state (bfloat16 needs no gradient scaler); backward passes run outside autocast, as
PyTorch recommends. `--compile` adds the same rows with the network wrapped in `torch.compile`
(the step's Python, including the finite-difference loop, stays eager; 'first step s' in the CSV
holds the compile time).

Each case runs in this process on a freshly built, seeded model. 'peak MiB' is
`torch.cuda.max_memory_allocated` over the timed steps (the peak is reset after the warm-up
steps, whose cuDNN autotuning and compilation would otherwise dominate it, and the first case
would pay for the autotuning of all): parameters, optimizer state, inputs and activations. After the warm-up steps every timed step is awaited with
`torch.cuda.synchronize` and the median is reported. images/s counts the images a step reads:
labeled + unlabeled for SemiMeta, labeled only for the supervised step. Without a GPU everything
runs on the CPU (peak MiB then shows '-').

Run on a GPU (the JAX rows to compare against come from `benchmark_step.py` on the same card;
its `finite_difference` mode is the official estimator, and its `jvp` mode the exact one at the
same cost):

  python -m experiments.benchmark_official_pytorch                # ConvLarge, 128 + 128, 32x32
  python -m experiments.benchmark_official_pytorch --compile --sync_free
  python -m experiments.benchmark_official_pytorch --model resnet18 --image_size 224 \
      --batch_size 64 --num_classes 1000                          # the ImageNet step per GPU
  python -m experiments.benchmark_step --modes=supervised,jvp,finite_difference
  python -m experiments.benchmark_step --modes=supervised,jvp,finite_difference --half_precision

and on a CPU, for a quick check: `python -m experiments.benchmark_official_pytorch --small`.
The table is printed and written to `<out>/benchmark_official_pytorch_<tag>.md` and `.csv`
(or to `--out` itself when it names a `.md` file).
"""

import argparse
import datetime
import os
import platform
import shlex
import sys

import torch

from experiments import results_table
from experiments.official_pytorch import models
from experiments.official_pytorch import timing

CASES = timing.CASES
PRECISIONS = timing.PRECISIONS
# The presets of benchmark_step.py, so that the same flags give the same sizes on both sides.
SIZES = {
    'default': dict(model='convlarge', model_width=0, batch_size=128, image_size=32, channels=3,
                    num_classes=10, steps=20, warmup_steps=3),
    'small': dict(model='convlarge', model_width=32, batch_size=32, image_size=32, channels=3,
                  num_classes=10, steps=10, warmup_steps=2),
}
COLUMNS = (  # (header, row key, format)
    ('case', 'case', '{}'), ('precision', 'precision', '{}'),
    ('median step ms', 'median_step_ms', '{:.1f}'), ('images/s', 'images_per_s', '{:.0f}'),
    ('peak MiB', 'peak_mib', '{:.1f}'),
)
CSV_FIELDS = (
    'device', 'torch', 'model', 'batch', 'input', 'num_classes', 'case', 'method', 'precision',
    'compile', 'sync_free', 'mixup', 'channels_last', 'cudnn_deterministic', 'images_per_step',
    'steps', 'warmup_steps', 'first_step_s', 'median_step_ms', 'min_step_ms', 'max_step_ms',
    'steps_per_s', 'images_per_s', 'peak_mib', 'error')


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def render_markdown(rows) -> str:
  """The rows as a markdown table (a failed row keeps its name and shows the error)."""
  return results_table.render_markdown(rows, COLUMNS)


def output_paths(out: str, tag: str) -> tuple[str, str]:
  """(markdown, csv) paths: `out` itself if it names a .md file, else files in directory `out`."""
  if out.endswith('.md'):
    return out, out[:-len('.md')] + '.csv'
  return (os.path.join(out, f'benchmark_official_pytorch_{tag}.md'),
          os.path.join(out, f'benchmark_official_pytorch_{tag}.csv'))


def write_results(rows, out: str, tag: str, notes=()) -> tuple[str, str]:
  """Writes the notes and the table (markdown) and all fields (CSV); returns both paths."""
  md_path, csv_path = output_paths(out, tag)
  results_table.write_markdown_and_csv(md_path, csv_path, render_markdown(rows), rows, CSV_FIELDS, notes)
  return md_path, csv_path


def _parse_args(argv):
  """Parses the flags and fills the unset sizes from the preset (`--small` or the default).

  Args:
    argv: the arguments after the program name; None for `sys.argv[1:]`.

  Returns:
    The argparse namespace, with `cases` and `precisions` as lists.
  """
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--small', action='store_true', help='CPU-sized defaults (SIZES["small"]).')
  for name, kind in (('model', str), ('model_width', int), ('batch_size', int), ('image_size', int),
                     ('channels', int), ('num_classes', int), ('steps', int), ('warmup_steps', int)):
    parser.add_argument(f'--{name}', type=kind, default=None, help='Overrides the size preset.')
  parser.add_argument('--cases', default=','.join(CASES), help=f'Comma-separated subset of {CASES}.')
  parser.add_argument('--precisions', default=','.join(PRECISIONS),
                      help=f'Comma-separated subset of {PRECISIONS}.')
  parser.add_argument('--compile', action='store_true',
                      help='Also time every case with the network under torch.compile.')
  parser.add_argument('--sync_free', action='store_true',
                      help='Also time the SemiMeta step without its host synchronisations.')
  parser.add_argument('--no_mixup', action='store_true',
                      help='SemiMeta with the labeled cross-entropy (train_meta.py without --mix-up).')
  parser.add_argument('--mixup_alpha', type=float, default=1.0, help='a of Beta(a, a).')
  parser.add_argument('--lr', type=float, default=0.1, help='Learning rate after warm-up.')
  parser.add_argument('--weight', type=float, default=1.0, help='Consistency weight after ramp-up.')
  parser.add_argument('--epsilon', type=float, default=1e-2, help='Relative finite-difference step.')
  parser.add_argument('--momentum', type=float, default=0.9)
  parser.add_argument('--weight_decay', type=float, default=1e-4)
  parser.add_argument('--channels_last', action='store_true',
                      help='NHWC layout for inputs and network (not the official default).')
  parser.add_argument('--cudnn_deterministic', default='official', choices=('official', 'on', 'off'),
                      help="'official': on for ConvLarge (train_meta.py), off for ResNet-18.")
  parser.add_argument('--device', default=None, help="e.g. 'cuda:0' or 'cpu'; default CUDA if any.")
  parser.add_argument('--threads', type=int, default=0,
                      help='torch.set_num_threads on the CPU (0 keeps the default).')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', '--out_dir', dest='out', default='results',
                      help='Output directory, or a .md file (the .csv goes beside it).')
  parser.add_argument('--tag', default=None, help='File name tag; default from model and size.')
  args = parser.parse_args(argv)
  preset = SIZES['small' if args.small else 'default']
  for name, value in preset.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  args.cases = [c.strip() for c in args.cases.split(',') if c.strip()]
  args.precisions = [p.strip() for p in args.precisions.split(',') if p.strip()]
  if sorted(set(args.cases) - set(CASES)):
    parser.error(f'unknown cases {sorted(set(args.cases) - set(CASES))}; expected a subset of {CASES}')
  if sorted(set(args.precisions) - set(PRECISIONS)):
    parser.error(f'unknown precisions {sorted(set(args.precisions) - set(PRECISIONS))}; '
                 f'expected a subset of {PRECISIONS}')
  return args


def main(argv=None):
  """Times every requested case, prints the notes and the table, and writes them.

  Args:
    argv: the arguments after the program name; None for `sys.argv[1:]`.

  Returns:
    The table rows, one per (variant, case, precision), failed ones with an 'error' field.
  """
  args = _parse_args(argv)
  device = torch.device(args.device) if args.device else torch.device(
      'cuda' if torch.cuda.is_available() else 'cpu')
  if args.threads:
    torch.set_num_threads(args.threads)
  # The official scripts' cuDNN settings (train_meta.py sets both; the ImageNet script only benchmark).
  torch.backends.cudnn.benchmark = True
  deterministic = {'on': True, 'off': False}.get(args.cudnn_deterministic, args.model == 'convlarge')
  torch.backends.cudnn.deterministic = deterministic

  variants = [(False, False)]  # (compiled, sync_free)
  if args.sync_free:
    variants.append((False, True))
  if args.compile:
    variants += [(True, sync_free) for _, sync_free in variants]

  rows = []
  for compiled, sync_free in variants:
    for case in args.cases:
      if sync_free and case != 'semimeta':
        continue  # The supervised step has no host synchronisation to remove.
      for precision in args.precisions:
        name = timing.case_name(case, compiled=compiled, sync_free=sync_free,
                                mixup=not args.no_mixup)
        try:
          row = timing.measure_case(
              case, precision=precision, model_name=args.model, model_width=args.model_width,
              batch_size=args.batch_size, image_size=args.image_size, channels=args.channels,
              num_classes=args.num_classes, steps=args.steps, warmup_steps=args.warmup_steps,
              device=device, compiled=compiled, sync_free=sync_free, mixup=not args.no_mixup,
              mixup_alpha=args.mixup_alpha, lr=args.lr, weight=args.weight, epsilon=args.epsilon,
              momentum=args.momentum, weight_decay=args.weight_decay,
              channels_last=args.channels_last, seed=args.seed)
        except Exception as error:  # pylint: disable=broad-except
          # One failing case (out of memory, a compile error) should not lose the others.
          row = {'case': name, 'precision': precision, 'error': f'{type(error).__name__}: {error}'[:200]}
          if device.type == 'cuda':
            torch.cuda.empty_cache()
        else:
          print(f'{name} [{precision}]: first step {row["first_step_s"]:.2f} s, '
                f'median step {row["median_step_ms"]:.1f} ms', file=sys.stderr, flush=True)
        rows.append(row)

  width = f'_w{args.model_width}' if args.model_width else ''
  tag = args.tag or f'{args.model}{width}_{args.image_size}px_b{args.batch_size}_{device.type}'
  command = ['-m', 'experiments.benchmark_official_pytorch'] + (sys.argv[1:] if argv is None else list(argv))
  device_name = torch.cuda.get_device_name(device) if device.type == 'cuda' else (
      f'CPU ({platform.machine()}, {torch.get_num_threads()} threads)')
  notes = [
      f'Command: `python {" ".join(shlex.quote(a) for a in command)}`',
      f'Date: {datetime.datetime.now().isoformat(timespec="seconds")}; torch {torch.__version__}; '
      f'device: {device_name}; host CPUs: {os.cpu_count()}.',
      f'Model: {models.model_source(args.model, args.model_width, args.channels)}; '
      f'batch {args.batch_size} '
      f'labeled + {args.batch_size} unlabeled; input {args.image_size}x{args.image_size}x'
      f'{args.channels}; {args.num_classes} classes; random inputs on the device.',
      f'Official step (train_meta.py): evaluation-mode meta step, finite-difference hypergradient '
      f'(epsilon {args.epsilon}), ' + ('no mix-up' if args.no_mixup else f'mix-up Beta({args.mixup_alpha})')
      + f'; SGD lr {args.lr}, momentum {args.momentum}, weight decay {args.weight_decay}; '
      f'consistency weight {args.weight}.',
      f'cudnn.benchmark True, cudnn.deterministic {deterministic}; cudnn.allow_tf32 '
      f'{torch.backends.cudnn.allow_tf32}, cuda.matmul.allow_tf32 {torch.backends.cuda.matmul.allow_tf32}; '
      f'memory format {"channels_last" if args.channels_last else "NCHW (official)"}.',
      f'Median of {args.steps} timed steps after {args.warmup_steps} warm-up steps, each awaited '
      '(torch.cuda.synchronize); bf16 = torch.autocast(bfloat16) with float32 parameters.',
      'peak MiB = torch.cuda.max_memory_allocated over the timed steps of each case (GPU only).',
      'images/s counts the images a step reads (the supervised step reads the labeled batch only).',
  ]
  md_path, csv_path = write_results(rows, args.out, tag, notes)
  print('\n'.join(notes) + '\n\n' + render_markdown(rows))
  print(f'Wrote {md_path} and {csv_path}.')
  return rows


if __name__ == '__main__':
  main()
