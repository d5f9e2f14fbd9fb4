"""Writes the built-in `digits` dataset (the same 1497/300 split) as a folder of PNGs.

Compare SemiMeta on the folder with the built-in dataset, same seeds:

  python experiments/digits_as_folder.py /tmp/digits_folder
  python -m semimeta_jax.main --config=configs/digits.py --workdir=runs/digits_s0 --config.seed=0
  python -m semimeta_jax.main --config=configs/digits.py --workdir=runs/folder_s0 --config.seed=0 \
      --config.data.folder=/tmp/digits_folder --config.data.image_size=0

Layout: ROOT/train/<digit>/<sklearn index>.png and ROOT/test/<digit>/<sklearn index>.png (no
unlabeled/: the unlabeled pool is the train images not drawn as labeled, as for `digits`).
"""

import pathlib
import sys

import numpy as np
from PIL import Image
from sklearn import datasets as sk_datasets

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from semimeta_jax.data import digits  # pylint: disable=g-import-not-at-top,wrong-import-position


def write(root: pathlib.Path):
  data = sk_datasets.load_digits()
  images = digits.to_uint8(data.images)[..., 0]
  train, test = digits.split_indices()
  for split, indices in (('train', train), ('test', test)):
    for i in indices:
      path = root / split / str(data.target[i]) / f'{i:04d}.png'
      path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(np.asarray(images[i], np.uint8), mode='L').save(path)


if __name__ == '__main__':
  write(pathlib.Path(sys.argv[1]))
