"""What one data-parallel step communicates: the collectives XLA inserts, per method and mode.

Compiles each training step over a mesh of `--devices` simulated CPU devices (the
partitioner's decisions do not depend on the platform) and reads the collectives
out of the optimised HLO: how many all-reduces (and other collectives) one step
issues, and how many bytes each device contributes. The state is replicated, so
the expected traffic is the parameter-sized gradient all-reduces plus small
batch-norm statistics; the table shows how many of each mode needs.

  python -m experiments.communication --model=convlarge --batch_size=128
"""

import argparse
import os
import pathlib
import re

_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
_BYTES = {'f64': 8, 'f32': 4, 'bf16': 2, 'f16': 2, 's32': 4, 'u32': 4, 's64': 8, 'u64': 8, 'pred': 1,
          's8': 1, 'u8': 1}
_SHAPE = re.compile(r'\b(f64|f32|bf16|f16|s32|u32|s64|u64|pred|s8|u8)\[([0-9,]*)\]')


def shape_bytes(text: str) -> int:
  """Bytes of every array shape in an HLO result type such as `(f32[3,3], f32[])`."""
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    count = 1
    for dim in filter(None, dims.split(',')):
      count *= int(dim)
    total += count * _BYTES[dtype]
  return total


def collectives(hlo_text: str) -> dict[str, tuple[int, int]]:
  """{collective: (count, bytes of results)} in an optimised HLO module."""
  found = {}
  for line in hlo_text.splitlines():
    match = re.search(r'=\s*(.+?)\s+(' + '|'.join(_COLLECTIVES) + r')(-start)?\(', line)
    if not match:
      continue
    count, size = found.get(match.group(2), (0, 0))
    found[match.group(2)] = (count + 1, size + shape_bytes(match.group(1)))
  return found


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', default='convlarge')
  parser.add_argument('--model_width', type=int, default=0)
  parser.add_argument('--batch_size', type=int, default=128, help='Global labeled (= unlabeled) batch.')
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--num_classes', type=int, default=10)
  parser.add_argument('--devices', type=int, default=8)
  parser.add_argument('--forward_mode', default='eval', choices=['eval', 'train'])
  parser.add_argument('--out_dir', default='results')
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_num_cpu_devices', args.devices)
  from experiments import benchmark_step  # pylint: disable=g-import-not-at-top
  from semimeta_jax import methods, models, parallel, state as state_lib  # pylint: disable=g-import-not-at-top

  mesh = parallel.make_mesh()
  shape = (args.image_size, args.image_size, 3)
  rows = []
  for mode in benchmark_step.MODES:
    config = benchmark_step.make_config(mode, model=args.model, model_width=args.model_width,
                                        batch_size=args.batch_size, forward_mode=args.forward_mode)
    model = models.get_model(config, args.num_classes)
    abstract_state = jax.eval_shape(
        lambda key: state_lib.init_train_state(config, model, shape, key), jax.random.key(0))
    batch = jax.eval_shape(lambda: benchmark_step.synthetic_batch(
        jax.random.key(1), args.batch_size, shape, args.num_classes))
    step = parallel.jit_train_step(methods.make_train_step(config, args.num_classes), mesh)
    hlo = step.lower(abstract_state, batch).compile().as_text()
    params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
    found = collectives(hlo)
    count, size = found.get('all-reduce', (0, 0))
    others = ', '.join(f'{k} x{c}' for k, (c, _) in found.items() if k != 'all-reduce') or '-'
    rows.append(f'| {mode} | {count} | {size / 2**20:.1f} | {size / (4 * params):.2f} | {others} |')
    print(rows[-1], flush=True)

  header = (f'Collectives of one training step, {args.model} ({params:,} parameters), global batch '
            f'{args.batch_size}+{args.batch_size}, {args.image_size}x{args.image_size}, {args.devices} '
            f'devices, meta forward `{args.forward_mode}`.\n\n'
            '| step | all-reduces | MiB all-reduced per device | in parameter-gradient units | other collectives |\n'
            '|---|---|---|---|---|')
  table = header + '\n' + '\n'.join(rows)
  print(table)
  os.makedirs(args.out_dir, exist_ok=True)
  path = pathlib.Path(args.out_dir) / f'communication_{args.model}_b{args.batch_size}_{args.forward_mode}.md'
  path.write_text(table + '\n')


if __name__ == '__main__':
  main()
