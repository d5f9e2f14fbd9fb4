"""Writes the built-in `digits` dataset (the same 1497/300 split) as a folder of PNGs.

Two layouts:

  * `python -m experiments.digits_as_folder ROOT`: ROOT/train/<digit>/<index>.png and
    ROOT/test/<digit>/<index>.png; the run draws its labeled images from train/ and the
    rest form the unlabeled pool, as for `digits` (but the draw differs: the folder's
    rows are in class-then-file order).
  * `python -m experiments.digits_as_folder ROOT --labeled_from=WORKDIR`: train/ holds only
    the images a built-in `digits` run in WORKDIR labeled (its labeled_indices.json), and
    unlabeled/ every other training image. Trained with `--config.data.num_labels=-1`,
    the folder run then sees exactly the built-in run's labeled images and unlabeled
    pool: the like-for-like comparison.

    python -m semimeta_jax.main --config=configs/digits.py --workdir=runs/digits_s0 --config.seed=0
    python -m experiments.digits_as_folder /tmp/digits_s0 --labeled_from=runs/digits_s0
    python -m semimeta_jax.main --config=configs/digits.py --workdir=runs/folder_s0 --config.seed=0 \
        --config.data.folder=/tmp/digits_s0 --config.data.image_size=0 --config.data.num_labels=-1

`--compare=RESULTS --seeds=0,1,2,3,4` does that for every seed whose built-in SemiMeta run
is in RESULTS/semimeta/seed_<k> (`python -m experiments.digits_results`) and prints both errors.
"""

import argparse
import json
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
from sklearn import datasets as sk_datasets

from semimeta_jax.data import digits

# Where `configs/` is: the runs this script starts read configs/digits.py from there.
REPO = pathlib.Path(__file__).resolve().parents[1]


def write(root: pathlib.Path, labeled_from: pathlib.Path | None = None):
  """Writes the PNG folder; with `labeled_from`, only that run's labeled images go in train/."""
  data = sk_datasets.load_digits()
  images = digits.to_uint8(data.images)[..., 0]
  train, test = digits.split_indices()
  labeled = None
  if labeled_from is not None:
    record = json.loads((labeled_from / 'labeled_indices.json').read_text())
    labeled = set(np.asarray(train)[record['indices']].tolist())  # Train-split rows -> sklearn rows.
  for split, indices in (('train', train), ('test', test)):
    for i in indices:
      if split == 'train' and labeled is not None and i not in labeled:
        path = root / 'unlabeled' / f'{i:04d}.png'
      else:
        path = root / split / str(data.target[i]) / f'{i:04d}.png'
      path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(np.asarray(images[i], np.uint8), mode='L').save(path)


def compare(results: pathlib.Path, seeds, out: pathlib.Path):
  """Trains SemiMeta on each seed's folder and tabulates it beside the built-in run."""
  rows = []
  for seed in seeds:
    builtin = results / 'semimeta' / f'seed_{seed}'
    summary = json.loads((builtin / 'summary.json').read_text())
    folder = out / f'folder_seed_{seed}'
    if not folder.exists():
      write(folder, builtin)
    workdir = out / f'run_seed_{seed}'
    if not (workdir / 'summary.json').exists():
      subprocess.run([sys.executable, '-m', 'semimeta_jax.main', '--config=configs/digits.py',
                      f'--workdir={workdir}', f'--config.seed={seed}',
                      f'--config.data.folder={folder}', '--config.data.image_size=0',
                      '--config.data.num_labels=-1'], cwd=REPO, check=True,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    mine = json.loads((workdir / 'summary.json').read_text())
    rows.append((seed, summary['final_error_top1'], mine['final_error_top1']))
    print(f'seed {seed}: built-in {rows[-1][1]:.2f}%  folder {rows[-1][2]:.2f}%', flush=True)
  builtin_errors, folder_errors = np.array([r[1] for r in rows]), np.array([r[2] for r in rows])
  table = ['| input | seeds | test error % (final) |', '|---|---|---|',
           f'| built-in digits | {len(rows)} | {builtin_errors.mean():.2f} ± {builtin_errors.std():.2f} |',
           f'| the same labeled images as a folder | {len(rows)} | '
           f'{folder_errors.mean():.2f} ± {folder_errors.std():.2f} |']
  differences = folder_errors - builtin_errors
  table.append(f'\nPaired difference (folder - built-in): {differences.mean():+.2f} ± '
               f'{differences.std(ddof=1) / np.sqrt(len(rows)) if len(rows) > 1 else 0:.2f} '
               '(mean ± standard error).')
  text = '\n'.join(table)
  print(text)
  (out / 'digits_as_folder.md').write_text(text + '\n')


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('root', type=pathlib.Path, help='Folder to write (or, with --compare, '
                      'where the folders, runs and table go).')
  parser.add_argument('--labeled_from', type=pathlib.Path, default=None,
                      help='A built-in digits run whose labeled images alone go in train/.')
  parser.add_argument('--compare', type=pathlib.Path, default=None,
                      help='digits_results.py output with semimeta/seed_<k> runs.')
  parser.add_argument('--seeds', default='0,1,2,3,4')
  args = parser.parse_args()
  if args.compare:
    args.root.mkdir(parents=True, exist_ok=True)
    compare(args.compare, [int(s) for s in args.seeds.split(',')], args.root)
  else:
    write(args.root, args.labeled_from)


if __name__ == '__main__':
  main()
